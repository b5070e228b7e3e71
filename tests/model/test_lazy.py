import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from baq.model import blocks, lazy
from baq.model import loader as models
from helpers import make_tiny_llama, make_tokenizer

SEQ = 12


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """The 3-block tiny Llama in many small shards (model.safetensors.index.json)."""
    path = _save(
        make_tiny_llama(layers=3), tmp_path_factory.mktemp("sharded"), max_shard_size="20KB"
    )
    assert (path / lazy.INDEX_FILE).is_file()
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return _save(make_tiny_llama().to(torch.bfloat16), tmp_path_factory.mktemp("bf16"))


def _ids(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n, SEQ), generator=g)


def _walk(model, loader, ids, device="cpu"):
    """Block-by-block forward: capture, each block loaded, run on every sample, released."""
    hidden, kwargs = blocks.capture_block_inputs(model, ids, device)
    kwargs = blocks.move_kwargs(kwargs, device)
    per_block = []
    for i in range(len(blocks.decoder_layers(model))):
        block = loader.load_block(i, device) if loader else blocks.decoder_layers(model)[i]
        hidden = [blocks.run_block(block, h.to(device), kwargs).cpu() for h in hidden]
        per_block.append(hidden)
        if loader:
            loader.release_block(i)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(torch.cat(hidden)))
    return per_block, logits


def _on_meta(block):
    return all(p.device.type == "meta" for p in block.parameters())


def test_can_load_lazily(tiny_model_dir, sharded_dir, tmp_path):
    assert lazy.can_load_lazily(tiny_model_dir)
    assert lazy.can_load_lazily(str(sharded_dir))
    assert lazy.can_load_lazily(None)  # the reference model's GGUF (tests/model/test_lazy_gguf.py)
    assert not lazy.can_load_lazily(tiny_model_dir, gguf_file="model.gguf")  # no such file
    assert not lazy.can_load_lazily(str(tmp_path / "model.gguf"))
    assert not lazy.can_load_lazily("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert not lazy.can_load_lazily(tmp_path)  # .bin weights: the full load handles them
    with pytest.raises(lazy.LazyLoadUnsupported):
        lazy.open_lazy(tmp_path)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_blocks_and_logits_match_full_load(layout, tiny_model_dir, sharded_dir):
    path = tiny_model_dir if layout == "single" else sharded_dir
    full, _ = models.load_model(str(path))
    model, tok, loader = lazy.open_lazy(path)
    assert tok is not None and tok("the").input_ids
    assert len(loader) == full.config.num_hidden_layers
    assert not model.config.use_cache and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like the full load
    assert all(_on_meta(block) for block in loader.blocks)
    assert loader.resident_nbytes() == full.model.embed_tokens.weight.nbytes + 64 * 4
    rotary = dict(model.named_buffers())
    for name, buf in full.named_buffers():
        assert torch.equal(rotary[name], buf), name  # non-persistent, rebuilt not read

    ids = _ids()
    want_blocks, want_logits = _walk(full, None, ids)
    got_blocks, got_logits = _walk(model, loader, ids)
    for want, got in zip(want_blocks, got_blocks):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert torch.equal(got_logits, want_logits)
    with torch.no_grad():
        ref = full(input_ids=ids).logits
    torch.testing.assert_close(got_logits, ref, rtol=0, atol=1e-6)
    assert all(_on_meta(block) for block in loader.blocks)


def test_load_release_cycle(sharded_dir):
    full, _ = models.load_model(str(sharded_dir))
    model, _, loader = lazy.open_lazy(sharded_dir, tokenizer=False)
    want = dict(full.named_parameters())
    for i in range(len(loader)):
        assert not loader.is_loaded(i)
        block = loader.load_block(i)
        assert block is loader.blocks[i] and loader.is_loaded(i)
        assert not _on_meta(block)
        # only this block is materialised
        assert all(_on_meta(b) for j, b in enumerate(loader.blocks) if j != i)
        for name, p in model.named_parameters():
            if p.device.type != "meta":
                assert torch.equal(p, want[name]), name
        assert loader.block_nbytes(i) == sum(p.nbytes for p in block.parameters())
        with torch.no_grad():
            block.mlp.down_proj.weight.zero_()  # a change is dropped by release
        loader.release_block(i)
        assert _on_meta(block) and not loader.is_loaded(i)
    loader.load_block(1)
    assert torch.equal(
        loader.blocks[1].mlp.down_proj.weight, full.model.layers[1].mlp.down_proj.weight
    )
    loader.load_block(1)  # loading a loaded block is a no-op
    loader.release_block(1)
    loader.release_block(1)  # and so is releasing a released one
    with pytest.raises(IndexError):
        loader.load_block(len(loader))


def test_release_keep_and_read(tiny_model_dir):
    full, _ = models.load_model(str(tiny_model_dir))
    model, _, loader = lazy.open_lazy(tiny_model_dir, tokenizer=False)
    block = loader.load_block(0)
    loader.release_block(0, keep=lambda name: "layernorm" in name)
    for name, p in block.named_parameters():
        assert (p.device.type == "meta") == ("layernorm" not in name), name
    assert not loader.is_loaded(0)
    loader.load_block(0)  # reads only the missing tensors
    assert torch.equal(block.self_attn.q_proj.weight, full.model.layers[0].self_attn.q_proj.weight)
    loader.release_block(0)
    names = ["model.layers.1.input_layernorm.weight", "lm_head.weight"]
    got = loader.read(names)
    assert torch.equal(got[names[0]], full.model.layers[1].input_layernorm.weight)
    assert torch.equal(got[names[1]], full.model.embed_tokens.weight)
    assert _on_meta(loader.blocks[1])
    with pytest.raises(KeyError):
        loader.read(["model.layers.0.nothing"])


def test_streaming_forward(sharded_dir):
    full, _ = models.load_model(str(sharded_dir))
    model, _, loader = lazy.open_lazy(sharded_dir, tokenizer=False)
    ids = _ids(2)
    seen = []

    def on_load(i, block):
        seen.append(i)
        assert not _on_meta(block)

    with torch.no_grad():
        ref = full(input_ids=ids).logits
        loader.load_block(1)  # a block loaded beforehand stays loaded
        with loader.streaming(on_load=on_load):
            got = model(input_ids=ids).logits
    assert seen == [0, 2]
    assert torch.equal(got, ref)
    assert loader.is_loaded(1) and _on_meta(loader.blocks[0]) and _on_meta(loader.blocks[2])


@pytest.mark.parametrize("dtype", ["auto", "float32", "float16"])
def test_bf16_checkpoint(bf16_dir, dtype):
    full, _ = models.load_model(str(bf16_dir), dtype=dtype)
    model, _, loader = lazy.open_lazy(bf16_dir, dtype=dtype, tokenizer=False)
    want = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
    assert full.dtype == want and model.model.embed_tokens.weight.dtype == want
    assert loader.dtype == want and model.config.dtype == want
    ids = _ids(2)
    want_blocks, want_logits = _walk(full, None, ids)
    got_blocks, got_logits = _walk(model, loader, ids)
    assert loader.blocks[0].self_attn.q_proj.weight.dtype == want
    for w, g in zip(want_blocks, got_blocks):
        assert all(torch.equal(a, b) for a, b in zip(w, g))
    assert got_logits.dtype == want and torch.equal(got_logits, want_logits)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_untied_head(tmp_path):
    src = make_tiny_llama()
    src.config.tie_word_embeddings = False
    src.lm_head.weight = nn.Parameter(torch.randn_like(src.lm_head.weight))
    _save(src, tmp_path)
    full, _ = models.load_model(str(tmp_path))
    model, _, loader = lazy.open_lazy(tmp_path, tokenizer=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    ids = _ids(2)
    assert torch.equal(_walk(model, loader, ids)[1], _walk(full, None, ids)[1])


def test_unmatched_checkpoint_names(tmp_path):
    _save(make_tiny_llama(), tmp_path)
    tensors = load_file(tmp_path / lazy.SINGLE_FILE)
    tensors["model.layers.0.attn.q.weight"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, tmp_path / lazy.SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(lazy.LazyLoadUnsupported, match="q_proj"):
        lazy.open_lazy(tmp_path, tokenizer=False)


def test_checkpoint_without_base_prefix(tmp_path):
    """Keys saved without the ``model.`` prefix of the base model still match."""
    src = make_tiny_llama()
    _save(src, tmp_path)
    tensors = load_file(tmp_path / lazy.SINGLE_FILE)
    tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / lazy.SINGLE_FILE, metadata={"format": "pt"})
    model, _, loader = lazy.open_lazy(tmp_path, tokenizer=False)
    ids = _ids(1)
    assert torch.equal(_walk(model, loader, ids)[1], _walk(src, None, ids)[1])


def test_block_buffers(tmp_path):
    """Persistent buffers of a block come from the checkpoint, non-persistent ones are built."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class BufferedConfig(LlamaConfig):
        model_type = "baq_test_buffered_llama"

    class BufferedLlama(LlamaForCausalLM):
        config_class = BufferedConfig

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.register_buffer("gain", torch.ones(config.hidden_size))
                shift = torch.arange(config.hidden_size, dtype=torch.float32) / 100
                layer.register_buffer("shift", shift, persistent=False)
                layer.register_forward_hook(lambda m, a, out: out * m.gain + m.shift)

    AutoConfig.register(BufferedConfig.model_type, BufferedConfig, exist_ok=True)
    AutoModelForCausalLM.register(BufferedConfig, BufferedLlama, exist_ok=True)
    cfg = BufferedConfig(**make_tiny_llama().config.to_diff_dict())
    src = BufferedLlama(cfg).eval()
    for layer in src.model.layers:
        layer.gain.uniform_(0.5, 1.5)
    _save(src, tmp_path)
    assert "model.layers.1.gain" in load_file(tmp_path / lazy.SINGLE_FILE)

    model, _, loader = lazy.open_lazy(tmp_path, tokenizer=False)
    block = loader.blocks[1]
    assert block.gain.device.type == "meta"
    assert torch.equal(block.shift, src.model.layers[1].shift)
    ids = _ids(2)
    want_blocks, want_logits = _walk(src, None, ids)
    got_blocks, got_logits = _walk(model, loader, ids)
    for w, g in zip(want_blocks, got_blocks):
        assert all(torch.equal(a, b) for a, b in zip(w, g))
    assert torch.equal(got_logits, want_logits)
    assert block.gain.device.type == "meta" and block.shift.device.type == "cpu"


def test_load_block_on_device(tiny_model_dir, device):
    full, _ = models.load_model(str(tiny_model_dir))
    model, _, loader = lazy.open_lazy(tiny_model_dir, tokenizer=False)
    ids = _ids(2)
    want_blocks, want_logits = _walk(full, None, ids)
    got_blocks, got_logits = _walk(model, loader, ids, device=device)
    tol = 0 if device.type == "cpu" else 1e-5
    for w, g in zip(want_blocks, got_blocks):
        for a, b in zip(w, g):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    assert all(_on_meta(block) for block in loader.blocks)
    assert all(p.device.type == "cpu" for p in model.model.embed_tokens.parameters())


def test_index_lists_missing_shard(sharded_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sharded_dir, copy)
    index = json.loads((copy / lazy.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (copy / victim).unlink()
    with pytest.raises(lazy.LazyLoadUnsupported, match="missing"):
        lazy.open_lazy(copy, tokenizer=False)


def test_to_device_and_streaming(tiny_model_dir, device):
    full, _ = models.load_model(str(tiny_model_dir))
    model, _, loader = lazy.open_lazy(tiny_model_dir, tokenizer=False)
    loader.load_block(0)
    loader.to(device)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == device.type
    assert model.model.rotary_emb.inv_freq.device.type == device.type
    assert loader.blocks[0].self_attn.q_proj.weight.device.type == device.type
    assert _on_meta(loader.blocks[1])
    ids = _ids(2)
    with torch.no_grad(), loader.streaming():
        got = model(input_ids=ids.to(device)).logits.cpu()
        ref = full(input_ids=ids).logits
    tol = 0 if device.type == "cpu" else 1e-4
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert _on_meta(loader.blocks[1]) and loader.is_loaded(0)


@pytest.mark.parametrize("max_bytes", [None, 0])
def test_walk_with_activation_store(sharded_dir, tmp_path, max_bytes):
    """The pipeline's pattern: captured inputs in a store, batched block forwards into a new one."""
    from baq.run.activations import ActivationStore

    full, _ = models.load_model(str(sharded_dir))
    model, _, loader = lazy.open_lazy(sharded_dir, tokenizer=False)
    ids = _ids(5)
    want, _ = _walk(full, None, ids)
    captured, kwargs = blocks.capture_block_inputs(model, ids, "cpu")
    inputs = ActivationStore.from_tensors(captured, max_bytes=max_bytes, dir=tmp_path)
    assert inputs.spilled == (max_bytes == 0)
    for i in range(len(loader)):
        block = loader.load_block(i)
        outputs = inputs.empty_like()
        for s in range(0, len(inputs), 2):
            outputs[s : s + 2] = blocks.run_block(block, inputs[s : s + 2], kwargs)
        loader.release_block(i)
        inputs.close()
        inputs = outputs
        torch.testing.assert_close(inputs[:], torch.cat(want[i]), rtol=0, atol=1e-6)
    inputs.close()
    assert list(tmp_path.iterdir()) == []
