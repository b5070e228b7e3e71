"""PEFT's LoRA on baq's packed linears: trains, the codes stay frozen, PEFT saves and loads."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import baq  # noqa: E402  (registers the baq quantizer with transformers)
from baq.config import QuantConfig  # noqa: E402
from baq.integrations.peft_lora import PackedLoraLinear, lora_config, register  # noqa: E402
from baq.saved.packed_linear import PackedLinear  # noqa: E402
from helpers import ids, make_tiny_llama, make_tokenizer, quantize_all  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = make_tiny_llama()
    cfg = QuantConfig(method="baq", allocation="layer", bits=3)
    path = tmp_path_factory.mktemp("peft") / "q"
    baq.save(path, model, make_tokenizer(), quantize_all(model, cfg), cfg)
    return path


def packed_state(model) -> list[torch.Tensor]:
    """Every buffer of every packed linear, in module order (PEFT renames the modules)."""
    return [
        t.clone()
        for mod in model.modules()
        if isinstance(mod, PackedLinear)
        for t in mod.state_dict().values()
    ]


def test_lora_trains_on_packed_linears_and_never_changes_a_code(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = packed_state(model)
    assert before  # the folder loaded into packed linears
    peft_model = get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    wrapped = [m for m in peft_model.modules() if isinstance(m, PackedLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)  # two blocks
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters()
                             if p.requires_grad)  # fmt: skip
    x = ids(4, 24)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2 and losses[1] < losses[0], losses
    after = packed_state(peft_model)
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # codes and grids untouched

    # PEFT's own save and load: a fresh quantized model with the adapters gives the same logits
    peft_model.save_pretrained(tmp_path / "adapters")
    fresh = AutoModelForCausalLM.from_pretrained(folder)
    config = register(LoraConfig.from_pretrained(tmp_path / "adapters"))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapters", config=config)
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        got = loaded(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():  # and the adapters changed the model
        base = AutoModelForCausalLM.from_pretrained(folder)(input_ids=x).logits
    assert not torch.allclose(base, want, atol=1e-4)


def test_lora_trains_on_a_rotated_model_after_an_inference_forward(folder):
    """The rotation's cached signs and Hadamard factors, first made under
    ``torch.inference_mode()`` (generation, evaluation), must not reach autograd as inference
    tensors when the adapters then train."""
    from baq.quant import rotation

    rotation._dense_factor.cache_clear()
    rotation._paley_hadamard.cache_clear()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert any(m.rotation is not None for m in model.modules() if isinstance(m, PackedLinear))
    x = ids(2, 16)
    with torch.inference_mode():
        model(input_ids=x)
    peft_model = get_peft_model(model, lora_config(r=2, target_modules=["q_proj"]))
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merging_into_packed_codes_is_refused(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    peft_model = get_peft_model(model, lora_config(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="requantize"):
        peft_model.merge_and_unload()
