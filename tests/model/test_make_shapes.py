"""benchmarks/make_shapes.py: the streamed shards and index load as ``save_pretrained``'s do."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import make_shapes  # noqa: E402

from baq.model import lazy  # noqa: E402
from baq.model import loader as models  # noqa: E402


def test_small_shape_loads_whole_and_lazily(tmp_path, monkeypatch):
    shape = {"hidden": 64, "intermediate": 96, "heads": 4, "kv_heads": 2}
    monkeypatch.setitem(make_shapes.SHAPES, "tiny", shape)
    out = tmp_path / "tiny"
    assert make_shapes.main(["tiny", str(out), "--blocks", "3"]) == 0
    index = json.loads((out / make_shapes.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3 + 2  # embedding, 3 blocks, head
    full, tok = models.load_model(str(out))
    assert full.dtype == torch.bfloat16 and full.config.vocab_size == len(tok) == 49152
    assert full.lm_head.weight is not full.model.embed_tokens.weight
    model, _, loader = lazy.open_lazy(out, tokenizer=False)
    want = dict(full.named_parameters())
    for i in range(len(loader)):
        block = loader.load_block(i)
        for name, p in block.named_parameters():
            assert torch.equal(p, want[f"model.layers.{i}.{name}"]), name
        loader.release_block(i)
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    q = full.model.layers[1].self_attn.q_proj.weight.float()
    assert abs(q.std().item() - 0.02) < 0.002  # random, not zeros
