"""Layer importances beta_l (baq.importance) against finite differences of the KL divergence."""

from __future__ import annotations

import pytest
import torch

from baq import blocks, importance
from conftest import make_tiny_llama


def windows(n=8, seq=48):
    return torch.randint(3, 512, (n, seq), generator=torch.Generator().manual_seed(2))


def kl_under_output_noise(model, ids, mod, sigma, draws=6):
    """Mean per-position KL(p || p_noisy) with N(0, sigma^2) added to ``mod``'s output, and
    the proxy loss it causes, mean_t |dy_t|^2 (= sigma^2 out_features in expectation)."""
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    gen = torch.Generator().manual_seed(5)
    kls, proxies = [], []
    for _ in range(draws):
        seen = {}

        def add_noise(m, args, out, seen=seen):
            noise = sigma * torch.randn(out.shape, generator=gen)
            seen["proxy"] = float(noise.double().square().sum(-1).mean())
            return out + noise

        h = mod.register_forward_hook(add_noise)
        with torch.no_grad():
            lq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        h.remove()
        kls.append(float((base.exp() * (base - lq)).sum(-1).mean()))
        proxies.append(seen["proxy"])
    return sum(kls) / draws, sum(proxies) / draws


@pytest.mark.parametrize(
    "layer", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
)
def test_fisher_beta_predicts_the_kl_of_small_output_perturbations(layer):
    model = make_tiny_llama()
    mods = dict(model.named_modules())
    w = windows(n=24)
    beta = importance.fisher_importance(model, w, {layer: mods[layer]}, torch.device("cpu"))[layer]
    kl, proxy = kl_under_output_noise(model, w, mods[layer], sigma=1e-2)
    # second order: KL ~ beta * proxy; the Fisher is estimated from sampled next tokens
    assert beta * proxy == pytest.approx(kl, rel=0.25)
    kl_small, proxy_small = kl_under_output_noise(model, w, mods[layer], sigma=3e-3)
    # a slope: the KL is quadratic in the perturbation (up to the noise of 6 draws)
    assert kl_small / proxy_small == pytest.approx(kl / proxy, rel=0.2)


def test_noise_estimator_agrees_with_fisher_and_leaves_the_model_unchanged():
    model = make_tiny_llama()
    layers = blocks.decoder_layers(model)
    prefix = blocks.module_prefix(model, layers)
    targets = {
        f"{prefix}{i}.{n}": m for i, b in enumerate(layers) for n, m in blocks.linears(b).items()
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = windows(n=16)
    noise = importance.noise_importance(model, w[:4], targets, torch.device("cpu"))
    fisher = importance.fisher_importance(model, w, targets, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # gradients switched back on
    ratio = torch.tensor([noise[n] / fisher[n] for n in targets]).log()
    spread = torch.tensor([fisher[n] for n in targets]).log()
    # both measure the same slope: agreement well within the decades the layers span
    assert ratio.abs().max() < 1.0 < float(spread.max() - spread.min())
