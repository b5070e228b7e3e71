"""Layer importances beta_l (baq.run.importance) against finite differences of the KL divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baq.model import blocks, lazy
from baq.run import importance
from helpers import make_tiny_llama


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


def whole_model_fisher(model, windows, targets, seed=0):
    """The Fisher estimator the obvious way: one backward of the whole model per window, next
    tokens sampled from its own predictions with the same generator as the block pass."""
    sums = {n: 0.0 for n in targets}
    gen = torch.Generator().manual_seed(seed)

    def watch(name):
        def hook(mod, args, out):
            out.register_hook(
                lambda g: sums.__setitem__(name, sums[name] + float(g.double().square().sum()))
            )

        return hook

    handles = [m.register_forward_hook(watch(n)) for n, m in targets.items()]
    leaf = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.detach().requires_grad_(True)
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for w in windows:
        logits = model(input_ids=w[None]).logits[0].float()
        probs = torch.softmax(logits.detach(), -1)
        labels = torch.multinomial(probs, 1, generator=gen)[:, 0]
        F.cross_entropy(logits, labels, reduction="sum").backward()
    for h in [*handles, leaf]:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    rows = {n: blocks.get_weight(m).shape[0] for n, m in targets.items()}
    return {n: sums[n] / windows.numel() / (2 * rows[n]) for n in targets}


def every_linear(model, head=False):
    layers = blocks.decoder_layers(model)
    prefix = blocks.module_prefix(model, layers)
    out = {
        f"{prefix}{i}.{n}": m for i, b in enumerate(layers) for n, m in blocks.linears(b).items()
    }
    if head:
        out["lm_head"] = model.get_output_embeddings()
    return out


def test_block_by_block_fisher_equals_one_backward_of_the_whole_model():
    model = make_tiny_llama(layers=3)
    targets = every_linear(model, head=True)
    w = windows(n=5)
    ref = whole_model_fisher(model, w, targets)
    got = importance.fisher_importance(model, w, targets, torch.device("cpu"))
    assert set(got) == set(ref)
    for name in targets:
        assert got[name] == pytest.approx(ref[name], rel=1e-4), name
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were taken


def test_fisher_of_a_lazily_loaded_model_equals_the_loaded_models(tmp_path):
    model = make_tiny_llama(layers=3)
    model.save_pretrained(tmp_path / "m")
    w = windows(n=3)
    full = importance.fisher_importance(model, w, every_linear(model), torch.device("cpu"))
    skeleton, _, loader = lazy.open_lazy(tmp_path / "m", tokenizer=False)
    got = importance.fisher_importance(
        skeleton, w, every_linear(skeleton), torch.device("cpu"), loader=loader
    )
    assert got == pytest.approx(full, rel=1e-5)
    assert not any(loader.is_loaded(i) for i in range(len(loader)))  # one block at a time
