"""Sharded saves (issue 28, item 3): weight files above --max-shard-size split as transformers
splits them, read back bit-exactly by baq.load, from_pretrained and baq export; a damaged,
missing, extra or misnamed shard refused in one line (docs/FORMAT.md section 1, SECURITY.md)."""

import json
import os
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM

import baq
from baq.cli import main
from baq.config import QuantConfig
from baq.saved import manifest, storage
from baq.saved.packed_linear import PackedLinear
from baq.saved.shards import parse_shard_size, plan_shards
from baq.saved.storage import StorageError
from helpers import (
    corpus,
    folder_bytes,
    ids,
    make_tiny_llama,
    make_tokenizer,
    quantize_all,
    quantize_argv,
    rehash_manifest,
)

CFG = QuantConfig(allocation="layer", method="baq", bits=2.5, group_size=16)
# the embedding (131072 bytes) alone, the rest of the dense file; three packed shards
SMALL = "20KB"
DENSE_SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
PACKED_SHARDS = [f"quantized-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def _save(folder, **kwargs):
    model = make_tiny_llama()
    results = quantize_all(model, CFG)
    storage.save_quantized(folder, model, make_tokenizer(), results, CFG, **kwargs)
    return results


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    results = _save(root / "whole")
    _save(root / "sharded", max_shard_size=SMALL)
    return root / "whole", root / "sharded", results


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def data_bytes(path):
    h = header(path)
    h.pop("__metadata__", None)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in h.values())


def owner(key):
    """The packed layer a tensor of quantized.safetensors belongs to (docs/FORMAT.md, 6)."""
    return key.split(".codes.")[0] if ".codes." in key else key.rpartition(".")[0]


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def buffers(model):
    return {
        f"{n}.{b}": t
        for n, m in model.named_modules()
        if isinstance(m, PackedLinear)
        for b, t in m.named_buffers(recurse=False)
    }


def assert_same_model(a, b):
    assert torch.equal(logits(a), logits(b))
    ba, bb = buffers(a), buffers(b)
    assert ba.keys() == bb.keys() and len(ba) > 0
    assert all(torch.equal(ba[k], bb[k]) for k in ba), [
        k for k in ba if not torch.equal(ba[k], bb[k])
    ]


# ----------------------------------------------------------------------------- the layout


def test_a_sharded_save_is_named_indexed_and_listed_as_transformers_does(saves):
    whole, sharded, _ = saves
    files = {p.name for p in sharded.iterdir()}
    assert set(DENSE_SHARDS + PACKED_SHARDS) <= files
    assert {"model.safetensors.index.json", "quantized.safetensors.index.json"} <= files
    assert not {"model.safetensors", "quantized.safetensors"} & files
    listed = json.loads((sharded / "manifest.json").read_text())["files"]
    assert set(listed) == files - {"manifest.json"}  # every shard and both indexes
    limit = parse_shard_size(SMALL)
    for stem, shards in (("model", DENSE_SHARDS), ("quantized", PACKED_SHARDS)):
        index = json.loads((sharded / f"{stem}.safetensors.index.json").read_text())
        where = {k: s for s in shards for k in header(sharded / s) if k != "__metadata__"}
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(data_bytes(sharded / s) for s in shards)
        # the same tensors, bit for bit, as the single file
        one = load_file(whole / f"{stem}.safetensors")
        parts = {k: t for s in shards for k, t in load_file(sharded / s).items()}
        assert one.keys() == parts.keys() and all(torch.equal(one[k], parts[k]) for k in one)
        for s in shards:
            keys = [k for k in header(sharded / s) if k != "__metadata__"]
            units = {owner(k) if stem == "quantized" else k for k in keys}
            assert data_bytes(sharded / s) <= limit or len(units) == 1, s


def test_each_packed_shard_describes_the_layers_it_holds_and_no_layer_is_split(saves):
    whole, sharded, _ = saves
    all_layers = json.loads(header(whole / "quantized.safetensors")["__metadata__"]["layers"])
    seen = {}
    for s in PACKED_SHARDS:
        h = header(sharded / s)
        meta = h.pop("__metadata__")
        assert meta["format"] == "baq" and meta["format_version"] == "2"
        layers = json.loads(meta["layers"])
        for name, m in layers.items():
            assert m == all_layers[name] and name not in seen
            seen[name] = s
        assert {owner(k) for k in h} == set(layers), (
            s
        )  # every tensor of a shard belongs to a layer it lists
    assert list(seen) == list(all_layers)  # file order kept


def _single_file_bytes(tensors, metadata):
    """What safetensors writes for ``tensors``, with the metadata keys sorted: the single-file
    save as it was before shards existed (save_file, then sort_metadata)."""
    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    h = {"__metadata__": dict(sorted(h.pop("__metadata__").items())), **h}
    text = json.dumps(h, separators=(",", ":")).encode()
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :]


def test_the_default_size_keeps_the_single_file_layout_byte_for_byte(saves, tmp_path):
    whole, _, _ = saves
    names = {p.name for p in whole.iterdir()}
    assert {"model.safetensors", "quantized.safetensors"} <= names
    assert not any("-of-" in n or n.endswith(".index.json") for n in names)
    # the very bytes of the old single-file writer
    q = whole / "quantized.safetensors"
    assert q.read_bytes() == _single_file_bytes(load_file(q), header(q)["__metadata__"])
    d = whole / "model.safetensors"
    assert d.read_bytes() == save(load_file(d), metadata={"format": "pt"})
    # and every file the same whatever the limit, down to the exact size of the packed data
    total = data_bytes(whole / "model.safetensors")  # the larger of the two weight files
    _save(tmp_path / "exact", max_shard_size=total)
    _save(tmp_path / "huge", max_shard_size="1000GB")
    assert folder_bytes(tmp_path / "exact") == folder_bytes(whole)
    assert folder_bytes(tmp_path / "huge") == folder_bytes(whole)
    _save(tmp_path / "less", max_shard_size=total - 1)
    assert (tmp_path / "less" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "less" / "quantized.safetensors").is_file()  # it still fits
    assert_same_model(baq.load(tmp_path / "less")[0], baq.load(whole)[0])  # one file, one sharded


# ----------------------------------------------------------------------------- reading back


def test_sharded_save_reloads_bit_exactly_through_baq_load_and_from_pretrained(saves):
    whole, sharded, results = saves
    reference, _ = baq.load(whole)
    by_baq, tok = baq.load(sharded)
    assert tok is not None
    assert_same_model(by_baq, reference)
    mods = dict(by_baq.named_modules())
    assert all(torch.equal(mods[n].dequantize(), r.weight) for n, r in results.items())
    by_hf = AutoModelForCausalLM.from_pretrained(sharded)
    assert_same_model(by_hf, reference)
    assert manifest.inspect_quantized(sharded) == manifest.inspect_quantized(whole)
    assert manifest.storage_bits(sharded) == manifest.storage_bits(whole)
    assert manifest.is_baq_save(sharded)


def test_save_pretrained_shards_and_force_replaces_a_sharded_save(saves, tmp_path):
    whole, sharded, _ = saves
    model = AutoModelForCausalLM.from_pretrained(whole)
    model.save_pretrained(tmp_path / "again", max_shard_size=SMALL)
    assert (tmp_path / "again" / "quantized.safetensors.index.json").is_file()
    assert_same_model(baq.load(tmp_path / "again")[0], model)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), model)
    model.save_pretrained(tmp_path / "again")  # a sharded baq save is replaced, by one file
    assert (tmp_path / "again" / "quantized.safetensors").is_file()
    assert not (tmp_path / "again" / "quantized.safetensors.index.json").exists()
    with pytest.raises(ValueError, match="max shard size"):
        model.save_pretrained(tmp_path / "bad", max_shard_size="5XB")
    assert not (tmp_path / "bad").exists()


def test_export_reads_a_sharded_save_and_shards_its_output(saves, tmp_path):
    whole, sharded, _ = saves
    for src, name in ((whole, "w"), (sharded, "s")):
        argv = ["export", str(src), "--dtype", "float32", "--output", str(tmp_path / name)]
        assert main([*argv, "--max-shard-size", "100KB"]) == 0
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    plain_w = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    plain_s = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert torch.equal(logits(plain_w), logits(plain_s))
    assert torch.equal(logits(plain_s), logits(baq.load(whole, cache="weight")[0]))


def test_quantize_and_eval_at_the_command_line(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "corpus.txt").write_text(corpus(100_000))
    setup = (tmp_path, tiny_model_dir, tmp_path / "corpus.txt")
    out = tmp_path / "q"
    assert main(quantize_argv(setup, out, "--max-shard-size", SMALL)) == 0
    assert (out / "quantized.safetensors.index.json").is_file()
    argv = ["eval", str(out), "--eval", "builtin", "--eval-windows", "2", "--eval-seqlen", "32"]
    assert main(argv) == 0
    assert "perplexity builtin" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["5XB", "0", "-3MB", "1.5GB", "GB", ""])
def test_a_bad_shard_size_is_refused_before_the_model_loads(size, tmp_path, no_model_load, capsys):
    (tmp_path / "corpus.txt").write_text(corpus(10_000))
    setup = (tmp_path, tmp_path / "no-such-model", tmp_path / "corpus.txt")
    assert main(quantize_argv(setup, tmp_path / "q", f"--max-shard-size={size}")) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-shard-size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()
    argv = ["export", str(tmp_path), "--output", str(tmp_path / "x"), f"--max-shard-size={size}"]
    assert main(argv) == 2
    assert "--max-shard-size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- untrusted shards


def _copy(sharded, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    return copy


def _edit_index(folder, stem, edit):
    path = folder / f"{stem}.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))
    rehash_manifest(folder, path.name)


def _drop_from_manifest(folder, rel):
    m = json.loads((folder / "manifest.json").read_text())
    del m["files"][rel]
    (folder / "manifest.json").write_text(json.dumps(m))


def _flip(folder, rel):
    data = bytearray((folder / rel).read_bytes())
    data[-1] ^= 1
    (folder / rel).write_bytes(bytes(data))


def _truncate(folder, rel):
    (folder / rel).write_bytes((folder / rel).read_bytes()[:-5])


def _missing_and_unlisted(folder, rel):
    (folder / rel).unlink()
    _drop_from_manifest(folder, rel)


def _extra_unlisted(folder, rel):
    shutil.copy(folder / rel, folder / "quantized-00004-of-00004.safetensors")


def _extra_listed(folder, rel):
    shutil.copy(folder / rel, folder / "quantized-00004-of-00004.safetensors")
    rehash_manifest(folder, "quantized-00004-of-00004.safetensors")


def _parent(folder, rel):
    (folder.parent / "x").write_bytes((folder / rel).read_bytes())
    _edit_index(folder, "quantized", lambda wm: wm.update(dict.fromkeys(wm, "../x")))


def _outside_manifest(folder, rel):
    # a shard the index names but the manifest does not list (the index's own hash recorded)
    os.rename(folder / rel, folder / "other.safetensors")
    _drop_from_manifest(folder, rel)

    def rename(wm):
        wm.update({k: "other.safetensors" for k, v in wm.items() if v == rel})

    _edit_index(folder, "quantized", rename)


def _moved_tensor(folder, rel):
    def move(wm):
        key = next(k for k, v in wm.items() if v != PACKED_SHARDS[-1])
        wm[key] = PACKED_SHARDS[-1]

    _edit_index(folder, "quantized", move)


def _linked(folder, rel):
    (folder.parent / "real").write_bytes((folder / rel).read_bytes())
    (folder / rel).unlink()
    os.symlink(folder.parent / "real", folder / rel)


def _stray_whole_file(folder, rel):
    shutil.copy(folder / DENSE_SHARDS[0], folder / "model.safetensors")


DAMAGE = {
    "flipped-byte": (_flip, r"SHA-256 differs"),
    "truncated": (_truncate, r"bytes, manifest\.json says .*truncated"),
    "missing": (lambda f, r: (f / r).unlink(), r"missing \(listed in manifest\.json\)"),
    "missing-and-unlisted": (_missing_and_unlisted, r"a file manifest\.json does not list"),
    "extra-unlisted": (_extra_unlisted, r"quantized-00004-of-00004\.safetensors: a weight file "),
    "extra-listed": (_extra_listed, r"quantized-00004-of-00004\.safetensors: a shard "),
    "index-names-parent": (_parent, r"shard '\.\./x' is not a plain file name"),
    "index-names-unlisted": (_outside_manifest, r"a file manifest\.json does not list"),
    "index-moves-a-tensor": (_moved_tensor, r"index\.json: puts tensor .* it is in"),
    "shard-is-a-link": (_linked, r"is a symbolic link"),
    "stray-model-safetensors": (_stray_whole_file, r"model\.safetensors: a weight file"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_bad_shard_is_refused_in_one_line_naming_it(case, saves, tmp_path, capsys):
    _, sharded, _ = saves
    copy = _copy(sharded, tmp_path)
    damage, pattern = DAMAGE[case]
    damage(copy, PACKED_SHARDS[0])
    with pytest.raises(StorageError, match=pattern) as err:
        baq.load(copy)
    assert "\n" not in str(err.value) and str(copy) in str(err.value)
    with pytest.raises(StorageError, match=pattern):
        AutoModelForCausalLM.from_pretrained(copy)
    with pytest.raises(StorageError, match=pattern):
        manifest.inspect_quantized(copy)
    assert main(["eval", str(copy), "--eval", "builtin", "--eval-windows", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]


# ----------------------------------------------------------------------------- sizes and plans

TRANSFORMERS_SIZES = ["5GB", "500MB", "10KB", "1GiB", "3MiB", "7KiB", "8Mb", "5Gb", "80Kb", "2gb"]


@pytest.mark.parametrize("text", TRANSFORMERS_SIZES)
def test_sizes_mean_what_they_mean_to_transformers(text):
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_shard_size(text) == convert_file_size_to_int(text)


def test_plain_sizes_and_bad_sizes():
    assert parse_shard_size(1234) == parse_shard_size("1234") == 1234
    for bad in ["5XB", "0", 0, -1, "1.5GB", "GB", "", "5 GB B", True, 2.5]:
        with pytest.raises(ValueError, match="max shard size"):
            parse_shard_size(bad)


def test_plan_shards_is_the_greedy_split_with_oversized_units_alone():
    rng = random.Random(0)
    for _ in range(300):
        limit = rng.randint(1, 50)
        sizes = [rng.randint(0, 60) for _ in range(rng.randint(0, 20))]
        plan = plan_shards(sizes, limit)
        assert [i for shard in plan for i in shard] == list(range(len(sizes)))  # in order
        for k, shard in enumerate(plan):
            used = sum(sizes[i] for i in shard)
            assert shard and (used <= limit or len(shard) == 1) or not sizes
            if k + 1 < len(plan):  # it started a new shard only because the next did not fit
                assert used + sizes[plan[k + 1][0]] > limit


# ----------------------------------------------------------------------------- packing on demand


def test_a_save_from_results_packs_each_shard_just_before_writing_it(tmp_path, monkeypatch):
    """save_quantized packs a layer only when the writer reaches its shard, once, and writes
    the bytes a save of the same layers packed up front writes: a 70B's packed layers (26 GiB
    at 3 bits) are never all in memory."""
    model = make_tiny_llama()
    results = quantize_all(model, CFG)
    qconfig = {"quant_method": "baq", "format_version": 1, "storage_bits": 0.0}
    eager = {name: PackedLinear.from_quantized(res) for name, res in results.items()}
    storage.save_packed(tmp_path / "eager", model, None, eager, qconfig, max_shard_size=SMALL)
    events = []
    make, write = storage.PackOnDemand.__getitem__, storage.save_file

    def spy_make(self, name):
        events.append(("pack", name))
        return make(self, name)

    def spy_write(tensors, filename, metadata=None):
        events.append(("write", {k.rsplit(".", 2)[0] for k in tensors if ".codes" in k}))
        return write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(storage.PackOnDemand, "__getitem__", spy_make)
    monkeypatch.setattr(storage, "save_file", spy_write)
    lazy = storage.PackOnDemand(results)
    storage.save_packed(tmp_path / "lazy", model, None, lazy, qconfig, max_shard_size=SMALL)
    assert folder_bytes(tmp_path / "lazy") == folder_bytes(tmp_path / "eager")
    packed = [name for kind, name in events if kind == "pack"]
    assert sorted(packed) == sorted(results)  # each layer packed once
    pending: set[str] = set()
    shards = 0
    for kind, what in events:
        if kind == "pack":
            pending.add(what)
        elif what:  # a quantized shard holds exactly the layers packed since the last one
            assert what == pending
            pending, shards = set(), shards + 1
    assert shards == 3 and not pending


def test_a_unit_that_differs_from_its_planned_size_is_refused(tmp_path):
    from baq.saved.shards import write_weights

    units = [lambda: {"a": torch.zeros(4)}, lambda: {"b": torch.zeros(3)}]
    with pytest.raises(RuntimeError, match="unit 1 has 12 bytes, planned 16"):
        write_weights(tmp_path, "x.safetensors", units, 10**6, lambda _: {}, sizes=[16, 16])
