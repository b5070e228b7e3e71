"""Nothing lost, nothing trusted (issue 29): baq replaces only its own saves, writes only regular
files, and checks everything it reads from a saved folder, a checkpoint or a measurement.

Every refusal is one line (exit code 2 at the command line) that names the problem and the fix,
and leaves nothing half-written; the data-loss cases check the foreign folder byte for byte.
"""

import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from baq.cli import main
from baq.config import QuantConfig
from baq.saved import manifest, storage
from baq.saved.storage import StorageError
from helpers import make_tiny_llama, make_tokenizer, quantize_all

QUICK = ["--nsamples", "4", "--seqlen", "32", "--eval", "none", "-q"]


def fails(capsys, argv, code=2):
    """Run ``baq argv``; check the exit code and that stderr is one ``baq:`` line; return it."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as their target text), by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = b"link:" + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"<dir>"
    return out


def web_app(path: Path) -> Path:
    """A web app: its own manifest.json (a PWA manifest), an index.html and a src/ tree."""
    (path / "src" / "components").mkdir(parents=True)
    (path / "manifest.json").write_text(
        json.dumps({"name": "My App", "start_url": "/", "files": {"index.html": {}}})
    )
    (path / "index.html").write_text("<!doctype html><script src=src/main.js></script>")
    (path / "src" / "main.js").write_text("console.log('hello')\n")
    (path / "src" / "components" / "button.js").write_bytes(bytes(range(256)))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A GPTQ 3-bit tiny Llama saved once (tests copy it before changing anything)."""
    model = make_tiny_llama()
    cfg = QuantConfig(method="gptq", bits=3)
    results = quantize_all(model, cfg)
    out = tmp_path_factory.mktemp("trust") / "q"
    storage.save_quantized(out, model, make_tokenizer(), results, cfg)
    return out, model, results


@pytest.fixture
def app(tmp_path):
    return web_app(tmp_path / "app")


# defect 1: --force and save_pretrained replace only baq saves


def test_force_keeps_a_foreign_folder_that_has_its_own_manifest(
    tiny_model_dir, app, no_model_load, capsys
):
    before = snapshot(app)
    err = fails(capsys, ["quantize", tiny_model_dir, "--output", app, "--force", *QUICK])
    assert "is not a baq model folder (its manifest.json is not a baq manifest)" in err
    assert "--force replaces only a previous baq save; choose another name" in err
    assert snapshot(app) == before


@pytest.mark.parametrize(
    "content",
    [
        {"format": "baq", "format_version": 99, "files": {}},
        {"format": "baq", "format_version": True, "files": {}},
        {"format": "baq", "format_version": 2, "files": []},
        "not json {",
    ],
    ids=["unknown-version", "bool-version", "files-not-object", "garbage"],
)
def test_a_manifest_that_is_not_a_baq_one_is_not_a_save(app, content):
    text = content if isinstance(content, str) else json.dumps(content)
    (app / "manifest.json").write_text(text)
    assert not manifest.is_baq_save(app)


def test_save_with_force_keeps_a_foreign_folder(saved, app):
    _, model, results = saved
    before = snapshot(app)
    with pytest.raises(StorageError, match="not a baq model folder .*choose another folder"):
        storage.save_quantized(app, model, None, results, QuantConfig(), force=True)
    assert snapshot(app) == before
    assert sorted(p.name for p in app.parent.iterdir()) == ["app"]  # no temp folder left


def test_save_pretrained_onto_a_foreign_folder_is_refused(saved, app, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved[0], device_map="cpu")
    before = snapshot(app)
    with pytest.raises(StorageError, match="not a baq model folder"):
        model.save_pretrained(app)
    assert snapshot(app) == before
    # a new folder, an empty one and a previous baq save are still fine
    model.save_pretrained(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "new")
    assert manifest.is_baq_save(tmp_path / "new") and manifest.is_baq_save(tmp_path / "empty")


def test_force_through_a_link_to_a_save_is_refused(saved, tmp_path, tiny_model_dir, capsys):
    target = tmp_path / "real"
    shutil.copytree(saved[0], target)
    before = snapshot(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    err = fails(capsys, ["quantize", tiny_model_dir, "--output", link, "--force", *QUICK])
    assert "is a symbolic link, not a folder" in err
    with pytest.raises(StorageError, match="symbolic link, not a folder"):
        storage.save_quantized(link, saved[1], None, saved[2], QuantConfig(), force=True)
    assert snapshot(target) == before and link.is_symlink()


# defect 2: a baq save is not a model to quantize


@pytest.mark.parametrize("command", ["quantize", "measure"])
def test_quantizing_a_baq_save_is_refused(saved, tmp_path, command, no_model_load, capsys):
    folder = tmp_path / "q"
    shutil.copytree(saved[0], folder)
    before = snapshot(folder)
    out = tmp_path / ("out" if command == "quantize" else "m.safetensors")
    quick = QUICK if command == "quantize" else QUICK[:4]
    err = fails(capsys, [command, folder, "--output", out, *quick])
    assert err == (
        f"baq: error: {folder} is a baq save, already quantized: {command} the original model, "
        f"or write plain weights with 'baq export {folder} --output DIR' first"
    )
    assert not out.exists()
    # onto itself with --force: refused, the save untouched
    if command == "quantize":
        fails(capsys, ["quantize", folder, "--output", folder, "--force", *QUICK])
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_save_without_its_manifest_is_still_refused_as_input(
    saved, tmp_path, no_model_load, capsys
):
    folder = tmp_path / "q"
    shutil.copytree(saved[0], folder)
    (folder / "manifest.json").unlink()
    err = fails(capsys, ["quantize", folder, *QUICK])
    assert "is a baq save, already quantized" in err


# defect 3: output files are new or regular files, never links, FIFOs or devices


def odd_file(tmp_path: Path, kind: str) -> tuple[Path, Path | None]:
    """``(path, what it points at)`` of a symbolic link, a FIFO or a device node."""
    path = tmp_path / f"odd-{kind}"
    if kind == "symlink":
        victim = tmp_path / "victim.txt"
        victim.write_text("precious")
        path.symlink_to(victim)
        return path, victim
    if kind == "fifo":
        os.mkfifo(path)
        return path, None
    try:  # a character device like /dev/null (needs root)
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        pytest.skip("cannot make a device node here")
    return path, None


def unchanged(path: Path, victim: Path | None, kind: str) -> None:
    mode = os.lstat(path).st_mode
    assert {"symlink": stat.S_ISLNK, "fifo": stat.S_ISFIFO, "device": stat.S_ISCHR}[kind](mode)
    if victim is not None:
        assert victim.read_text() == "precious"
    assert not list(path.parent.glob(f".{path.name}.*")), "temp file left behind"


KINDS = ["symlink", "fifo", "device"]
WHAT = {"symlink": "a symbolic link", "fifo": "a FIFO (named pipe)", "device": "a device"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["quantize --report", "measure --output", "eval --report"])
def test_an_output_file_that_is_not_a_regular_file_is_refused(
    kind, command, tiny_model_dir, tmp_path, no_model_load, capsys
):
    path, victim = odd_file(tmp_path, kind)
    name, flag = command.split()
    extra = {"quantize": QUICK, "measure": QUICK[:4], "eval": ["--eval-seqlen", "32"]}[name]
    err = fails(capsys, [name, tiny_model_dir, flag, path, *extra])
    assert err == (
        f"baq: error: {flag} {path}: is {WHAT[kind]}, and baq writes only new or regular "
        "files; give the path of a regular file"
    )
    unchanged(path, victim, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_output_folder_that_is_a_fifo_or_device_is_refused(
    kind, tiny_model_dir, tmp_path, no_model_load, capsys
):
    path, victim = odd_file(tmp_path, kind)
    err = fails(capsys, ["quantize", tiny_model_dir, "--output", path, "--force", *QUICK])
    assert f"--output {path}: is {WHAT[kind]}, not a folder" in err
    unchanged(path, victim, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_every_atomic_writer_refuses_a_path_that_is_not_a_regular_file(kind, tmp_path):
    import torch

    from baq.atomic import UnsafeOutput
    from baq.run import report
    from baq.run.measure import Measurement

    path, victim = odd_file(tmp_path, kind)
    meas = Measurement(["a"], [(2, 3)], {"a": torch.ones(3)}, {"fisher": {"a": 1.0}})
    writers = [
        lambda: report.write_json(path, {"a": 1}),
        lambda: report.write_safetensors(path, {"t": torch.zeros(2)}, {}),
        lambda: meas.save(path),
    ]
    for write in writers:
        with pytest.raises(UnsafeOutput, match=re.escape(f"is {WHAT[kind]}, and baq writes only")):
            write()
        unchanged(path, victim, kind)


# defect 6: a measurement read from disk is checked before use


def measurement_file(tmp_path: Path, **change) -> Path:
    """A valid two-layer measurement file, with ``change`` applied: metadata keys to new JSON
    values (None drops the key), ``tensors`` to replace the tensors."""
    import torch
    from safetensors.torch import save_file

    from baq.run.measure import MEASUREMENT_FORMAT

    meta = {
        "format": MEASUREMENT_FORMAT,
        "names": ["a", "b"],
        "shapes": [[4, 8], [4, 8]],
        "beta": {"fisher": {"a": 1.0, "b": 2.0}},
        "settings": {"sensitivity": "analytic"},
        "seconds": {},
    }
    tensors = {"sens/a": torch.ones(8, dtype=torch.float64), "sens/b": torch.rand(8).double()}
    tensors = change.pop("tensors", tensors)
    for key, value in change.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata=text)
    return path


def _sens(**t):
    import torch

    base = {"sens/a": torch.ones(8, dtype=torch.float64), "sens/b": torch.ones(8).double()}
    return base | t


def _bad_measurements():
    import torch

    nan = torch.ones(8).double()
    nan[3] = float("nan")
    return {
        "zero-sensitivities": (
            {"tensors": _sens(**{"sens/a": torch.zeros(8).double()})},
            "layer a: every sensitivity is zero",
        ),
        "nan-sensitivities": (
            {"tensors": _sens(**{"sens/b": nan})},
            "layer b: NaN, infinite or negative sensitivities",
        ),
        "negative-sensitivities": (
            {"tensors": _sens(**{"sens/b": -torch.ones(8).double()})},
            "layer b: NaN, infinite or negative sensitivities",
        ),
        "wrong-shape": (
            {"shapes": [[4, 8], [4, 16]]},
            "layer b: sensitivities (8,) torch.float64, expected (16,)",
        ),
        "shapes-not-ints": ({"shapes": [[4, 8], [4, "8"]]}, "is not two positive integers"),
        "negative-beta": (
            {"beta": {"fisher": {"a": -1.0, "b": 2.0}}},
            "fisher importance of a is -1.0: it must be finite and positive",
        ),
        "nan-beta": ({"beta": {"fisher": {"a": "NaN", "b": 2.0}}}, "importance of a is 'NaN'"),
        "beta-missing-a-layer": (
            {"beta": {"fisher": {"a": 1.0}}},
            "fisher importances must name exactly the measured layers",
        ),
        "noise-none-positive": (
            {"beta": {"noise": {"a": -1.0, "b": 0.0}}},
            "no noise importance is positive",
        ),
        "unknown-estimator": ({"beta": {"magic": {"a": 1.0, "b": 1.0}}}, "estimator 'magic'"),
        "missing-key": ({"shapes": None}, "metadata 'shapes' is missing"),
        "missing-tensor": ({"tensors": {"sens/a": torch.ones(8).double()}}, "no sensitivities"),
        "extra-tensor": (
            {"tensors": _sens(**{"sens/c": torch.ones(8).double()})},
            "unexpected tensor sens/c",
        ),
        "names-twice": ({"names": ["a", "a"]}, "'names' lists a layer twice"),
        "not-json": ({"settings": "{oops"}, "metadata 'settings' is not JSON"),
    }


BAD_MEASUREMENTS = _bad_measurements()


@pytest.mark.parametrize("case", sorted(BAD_MEASUREMENTS))
def test_a_bad_measurement_is_refused_naming_the_file(case, tmp_path, capsys):
    change, message = BAD_MEASUREMENTS[case]
    path = measurement_file(tmp_path, **change)
    err = fails(capsys, ["plan", "--measurement", path])
    assert err.startswith(f"baq: error: {path}: ") and message in err, err
    assert err.endswith("; measure again with baq measure")


def test_the_valid_measurement_plans(tmp_path, capsys):
    path = measurement_file(tmp_path)
    assert main(["plan", "--measurement", str(path), "--bits", "3"]) == 0
    # the noise estimator's difference may be <= 0 for a layer: floored by the allocation
    path = measurement_file(tmp_path, beta={"noise": {"a": -1e-8, "b": 2.0}})
    assert main(["plan", "--measurement", str(path), "--importance", "noise"]) == 0


def test_a_bad_measurement_is_refused_before_the_model_loads(
    tiny_model_dir, tmp_path, no_model_load, capsys
):
    path = measurement_file(tmp_path, tensors=_sens(**{"sens/a": _zeros()}))
    out = tmp_path / "out"
    argv = ["quantize", tiny_model_dir, "--measurement", path, "--output", out, *QUICK]
    err = fails(capsys, argv)
    assert "every sensitivity is zero" in err
    assert not out.exists() and not Path(f"{out}.partial").exists()


def _zeros():
    import torch

    return torch.zeros(8).double()


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_model_dir):
    """A real measurement of the tiny model (``baq measure``), and a corpus."""
    root = tmp_path_factory.mktemp("measured")
    text = root / "corpus.txt"
    from helpers import corpus

    text.write_text(corpus(40_000))
    path = root / "m.safetensors"
    calib = ["--calib", text, "--nsamples", "4", "--seqlen", "32"]
    assert main([str(a) for a in ["measure", tiny_model_dir, "--output", path, *calib, "-q"]]) == 0
    return path, calib


def test_a_measurement_of_another_model_leaves_no_partial(measured, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny_llama(seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    path, calib = measured
    out = tmp_path / "out"
    argv = ["quantize", other, "--measurement", path, "--output", out, *calib, "--eval", "none"]
    err = fails(capsys, [*argv, "-q"])
    assert "the measurement was made for another run (model weights differ)" in err
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_hand_edited_layer_shapes_are_refused_against_the_model(
    measured, tiny_model_dir, tmp_path, capsys
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, calib = measured
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shapes = json.loads(meta["shapes"])
    shapes[0][0] *= 4  # rows are not in the sensitivities: only the model can tell
    meta["shapes"] = json.dumps(shapes)
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    out = tmp_path / "out"
    argv = ["quantize", tiny_model_dir, "--measurement", edited, "--output", out, *calib]
    err = fails(capsys, [*argv, "--eval", "none", "-q"])
    assert "it was made for another model" in err
    assert not out.exists() and not Path(f"{out}.partial").exists()


# defect 5: a checkpoint block is checked before a resumed run uses it


@pytest.fixture(scope="module")
def block_folder(tmp_path_factory):
    """A checkpoint folder holding one finished block of a GPTQ 3-bit tiny Llama."""
    from baq.quant.layer import LayerRecord
    from baq.run.checkpoint import Checkpoint

    model = make_tiny_llama()
    results = quantize_all(model, QuantConfig(method="gptq", bits=3, group_size=16))
    block0 = {n: r for n, r in results.items() if n.startswith("model.layers.0.")}
    records = [LayerRecord(n, tuple(r.codes.shape), "gptq", 2.0, 0.1) for n, r in block0.items()]
    folder = tmp_path_factory.mktemp("ckpt") / "out.partial"
    folder.mkdir()
    Checkpoint(folder, {}).save_block(0, block0, records)
    return folder


def _edit_block(folder: Path, edit) -> None:
    """Change block 0's tensors in place: ``edit(tensors, meta)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "block-00000.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


Q = "model.layers.0.self_attn.q_proj"


def _set(key, fn):
    def edit(tensors, meta):
        tensors[key] = fn(tensors[key].clone())

    return edit


def _nan(t):
    t[0, 0] = float("nan")
    return t


def _top(t):
    t[0, 0] = 255
    return t


def _zero_levels(t):
    t[0] = 0
    return t


def _drop(key):
    def edit(tensors, meta):
        del tensors[key]

    return edit


def _meta(value):
    def edit(tensors, meta):
        meta["layers"] = value

    return edit


BAD_BLOCKS = {
    "nan-range": (_set(f"{Q}.lo", _nan), "safetensors", "NaN or infinite ranges or losses"),
    "code-out-of-range": (_set(f"{Q}.codes", _top), "safetensors", "codes outside [0, L - 1]"),
    "zero-levels": (_set(f"{Q}.levels", _zero_levels), "safetensors", "a level count below 1"),
    "missing-tensor": (_drop(f"{Q}.losses"), "safetensors", f"tensor {Q}.losses is missing"),
    "wrong-size": (_set(f"{Q}.hi", lambda t: t[:, :1].contiguous()), "safetensors", "hi has shape"),
    "sym-string": (
        _meta(json.dumps({Q: {"group_size": 16, "sym": "false", "dim": "oc"}})),
        "safetensors",
        "sym 'false'",
    ),
    "no-metadata": (_meta("{"), "safetensors", "damaged checkpoint block"),
}


@pytest.mark.parametrize("case", sorted(BAD_BLOCKS))
def test_a_damaged_checkpoint_block_is_refused_naming_its_file(block_folder, tmp_path, case):
    from baq.run.checkpoint import Checkpoint

    edit, suffix, message = BAD_BLOCKS[case]
    folder = tmp_path / "out.partial"
    shutil.copytree(block_folder, folder)
    _edit_block(folder, edit)
    with pytest.raises(ValueError) as info:
        Checkpoint(folder, {}).load_block(0)
    text = str(info.value)
    assert text.startswith(f"{folder / ('block-00000.' + suffix)}: damaged checkpoint block (")
    assert message in text and "\n" not in text
    assert text.endswith(f"; delete {folder} and run again without --resume")


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"name": "x"}], "bad record"),
        (["oops"], "bad record: a record is not an object"),
        ({"not": "a list"}, "bad layout"),
    ],
)
def test_a_bad_record_is_refused_naming_the_json(block_folder, tmp_path, records, message):
    from baq.run.checkpoint import Checkpoint

    folder = tmp_path / "out.partial"
    shutil.copytree(block_folder, folder)
    info = json.loads((folder / "block-00000.json").read_text())
    info["records"] = records
    (folder / "block-00000.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        Checkpoint(folder, {}).load_block(0)
    assert str(err.value).startswith(f"{folder / 'block-00000.json'}: damaged checkpoint block")


def test_the_untouched_block_loads(block_folder):
    from baq.run.checkpoint import Checkpoint

    results, records = Checkpoint(block_folder, {}).load_block(0)
    assert Q in results and len(records) == len(results)


def test_resuming_a_block_with_nan_ranges_is_refused(measured, tiny_model_dir, tmp_path, capsys):
    from baq.run import checkpoint

    _, calib = measured
    out = tmp_path / "out"
    argv = [
        "quantize", tiny_model_dir, "--method", "gptq", "--output", out, *calib, "--eval", "none",
        "-q",
    ]  # fmt: skip
    save = checkpoint.Checkpoint.save_block

    def save_then_stop(self, index, results, records):
        save(self, index, results, records)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint.Checkpoint, "save_block", save_then_stop)
        assert main([str(a) for a in argv]) == 130
    partial = Path(f"{out}.partial")
    _edit_block(partial, _set(f"{Q}.lo", _nan))
    err = fails(capsys, [*argv, "--resume"])
    assert f"{partial / 'block-00000.safetensors'}: damaged checkpoint block (layer {Q}" in err
    assert not out.exists()


# defects 7 and 9: only the files the manifest lists are read, and never through a link


@pytest.fixture
def copy(saved, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(saved[0], out)
    return out


def rehash(folder: Path, rel: str | None = None, drop: str | None = None) -> None:
    """Record ``rel``'s new size and hash in the manifest (or ``drop`` it), as a forger would."""
    import hashlib

    manifest_path = folder / "manifest.json"
    data = json.loads(manifest_path.read_text())
    if rel is not None:
        raw = (folder / rel).read_bytes()
        data["files"][rel] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if drop is not None:
        del data["files"][drop]
    manifest_path.write_text(json.dumps(data))


def test_an_unlisted_generation_config_is_ignored(copy, caplog):
    caplog.set_level(logging.WARNING, logger="baq")
    path = copy / "generation_config.json"
    gen = json.loads(path.read_text())
    gen["max_length"] = 7
    path.write_text(json.dumps(gen))
    rehash(copy, drop="generation_config.json")
    model, _ = storage.load_quantized(copy)
    assert model.generation_config.max_length != 7
    assert "files not in manifest.json ignored: generation_config.json" in caplog.text


def test_an_unlisted_tokenizer_is_ignored(saved, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="baq")
    _, model, results = saved
    out = tmp_path / "q"
    storage.save_quantized(out, model, None, results, QuantConfig(method="gptq", bits=3))
    make_tokenizer().save_pretrained(out)  # added afterwards, not in the manifest
    loaded, tok = storage.load_quantized(out)
    assert tok is None
    assert "tokenizer.json" in caplog.text and "ignored" in caplog.text


def test_the_listed_tokenizer_is_loaded_and_named_by_the_folder(saved):
    _, tok = storage.load_quantized(saved[0])
    assert tok.get_vocab() == make_tokenizer().get_vocab()
    assert tok.name_or_path == str(saved[0])


@pytest.mark.parametrize("rel", ["model.safetensors", "README.md"])
def test_a_link_inside_a_saved_folder_is_refused(copy, tmp_path, rel):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(copy / rel, outside / rel)  # the same bytes: the hashes still match
    (copy / rel).symlink_to(outside / rel)
    with pytest.raises(StorageError) as info:
        storage.load_quantized(copy)
    assert str(info.value) == (
        f"{copy / rel}: is a symbolic link; a saved folder holds regular files only: copy the "
        "folder without links (cp -rL) or save it again"
    )


def test_a_readme_linked_to_a_system_file_leaks_nothing(copy, capsys):
    (copy / "README.md").unlink()
    (copy / "README.md").symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/")
    err = fails(capsys, ["inspect", copy])
    assert "is a symbolic link" in err and "bytes" not in err


def test_a_linked_manifest_is_refused(copy, tmp_path):
    shutil.move(copy / "manifest.json", tmp_path / "manifest.json")
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(StorageError, match="manifest.json: is a symbolic link"):
        storage.load_quantized(copy)


# defect 8: the model card escapes what it writes


EVIL = {
    "base_model": "evil/x\nlicense: mit\npipeline_tag: <script>alert(1)</script>",
    "method": "gptq\n- injected\n<img src=x onerror=alert(1)>",
    "baq_version": "<b>1.0</b> | extra cell",
    "summary": {"perplexity_after": {"<i>set</i>\n---": 5.0}},
}


def front_matter(card: str) -> list[str]:
    lines = card.splitlines()
    assert lines[0] == "---"
    return lines[1 : lines.index("---", 1)]


def test_the_model_card_escapes_what_it_writes():
    from baq.saved.model_card import model_card

    card = model_card({"bits": 3, **EVIL})
    assert front_matter(card) == [
        "library_name: transformers",
        "tags:",
        "- baq",
        "- quantized",
        "- unknown",
    ]
    for bad in ("<script", "<img", "<b>", "<i>", "license", "injected\n"):
        assert bad not in card, bad
    assert "| baq version | &lt;b&gt;1.0&lt;/b&gt; &#124; extra cell |" in card
    good = model_card({"bits": 3, "method": "gptq", "base_model": "org/model-1.5B"})
    assert front_matter(good)[:2] == [
        "base_model: org/model-1.5B",
        "base_model_relation: quantized",
    ]


def test_a_save_pretrained_round_trip_adds_no_fields_or_html(copy, tmp_path):
    from transformers import AutoModelForCausalLM

    before = front_matter((copy / "README.md").read_text())
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(
        base_model=EVIL["base_model"], baq_version=EVIL["baq_version"]
    )
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy, "config.json")
    model = AutoModelForCausalLM.from_pretrained(copy, device_map="cpu")
    model.save_pretrained(tmp_path / "again")
    card = (tmp_path / "again" / "README.md").read_text()
    assert front_matter(card) == before
    for bad in ("<script", "<b>", "license", "pipeline_tag"):
        assert bad not in card, bad


# defect 10 (part): layer metadata types


def test_sym_as_a_string_is_a_type_error(copy):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = copy / "quantized.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    first = next(iter(layers))
    layers[first]["sym"] = "false"
    meta["layers"] = json.dumps(layers)
    save_file(tensors, str(path), metadata=meta)
    rehash(copy, "quantized.safetensors")
    with pytest.raises(StorageError, match=f"layer {first}: sym 'false' is not true or false"):
        storage.load_quantized(copy)


# defect 10: smaller ones


def _forge_layer(folder: Path, edit) -> str:
    """Apply ``edit(tensors, first_layer)`` to quantized.safetensors, rehashed; the layer name."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "quantized.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = next(iter(json.loads(meta["layers"])))
    edit(tensors, first, torch)
    save_file(tensors, str(path), metadata=meta)
    rehash(folder, "quantized.safetensors")
    return first


def _set_class(row, col, value):
    def edit(t, name, torch):
        table = t[f"{name}.level_classes"].clone()
        table[row, col] = value
        t[f"{name}.level_classes"] = table

    return edit


def _nan_lo(t, name, torch):
    t[f"{name}.lo"] = t[f"{name}.lo"].clone().fill_(float("nan"))


INSPECT_CASES = {
    "zero-level": (_set_class(0, 0, 0), "level_classes is not a table of ascending level counts"),
    "negative-level": (_set_class(0, 0, -3), "level_classes is not a table of ascending level"),
    "zero-columns": (_set_class(0, 1, 0), "level_classes is not a table of ascending level"),
    "nan-range": (_nan_lo, "lo/.hi hold NaN or Inf"),
    "extra-tensor": (lambda t, name, torch: t.update(junk=torch.zeros(3)), "unexpected tensor"),
}


@pytest.mark.parametrize("case", list(INSPECT_CASES))
def test_inspect_refuses_what_eval_refuses(copy, case, capsys):
    """``baq inspect`` ran no layer checks: it printed a table for folders ``baq eval`` refuses,
    and "math domain error" for a level count of zero."""
    edit, message = INSPECT_CASES[case]
    name = _forge_layer(copy, edit)
    with pytest.raises(StorageError) as loaded:
        storage.load_quantized(copy)
    err = fails(capsys, ["inspect", copy])
    assert err == f"baq: error: {loaded.value}"
    assert message in err and "math domain" not in err
    assert (name in err) or case == "extra-tensor"


def test_inspect_still_prints_a_sound_folder(copy, capsys):
    assert main(["inspect", str(copy)]) == 0
    assert "storage bits per weight" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["to_dict", "to_json_string", "update", "__class__", "self"])
def test_a_quantization_config_key_that_hides_a_method_still_loads(copy, tmp_path, key, caplog):
    """A key named like one of the config's own attributes (or like ``self``, the constructor's
    first argument) gave a TypeError in from_pretrained: it is ignored with a warning."""
    import torch
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.WARNING, logger="baq")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"][key] = {"x": 1}
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy, "config.json")
    model = AutoModelForCausalLM.from_pretrained(copy, device_map="cpu")
    qc = model.config.quantization_config
    block = qc.to_dict()
    assert json.loads(qc.to_json_string()) == block
    if key == "self":  # an ordinary field for the config: kept, round trip unchanged
        assert block["self"] == {"x": 1}
    else:
        assert key not in block
        assert "quantization_config keys ignored" in caplog.text and key in caplog.text
    reference, _ = storage.load_quantized(copy)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    model.save_pretrained(tmp_path / "again")  # to_dict() is what it writes
    assert manifest.is_baq_save(tmp_path / "again")


def test_a_huge_group_size_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["quantize", tiny_model_dir, "--group-size", "99999999999999999999", "--output", out]
    err = fails(capsys, [*argv, *QUICK])
    assert err.startswith("baq: error: --group-size=99999999999999999999: use a positive integer")
    assert list(tmp_path.iterdir()) == []


EVAL32 = ["--eval", "builtin", "--eval-seqlen", "32"]
FLAG_CASES = {
    "end-too-close": (["--calib-end", "20"], "--calib-end"),
    "negative-start": (["--calib-start", "-1"], "--calib-start"),
    "end-past-the-text": (["--calib-end", "99999999"], "--calib-end"),
    "late-start": (["--calib-start", "65480"], "--calib-start"),
    "too-many-eval-windows": ([*EVAL32, "--eval-windows", "100000"], "--eval-windows"),
    "eval-windows-near-the-end": ([*EVAL32, "--eval-windows", "2046"], "--eval-windows"),
    "end-before-the-eval-windows": (
        [*EVAL32, "--eval-windows", "2000", "--calib-end", "64010"],
        "--eval-windows",
    ),
}


def accepted_flags(command: str) -> set[str]:
    from baq.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices[command]._option_string_actions)


@pytest.mark.parametrize(
    "case,command",
    [(c, cmd) for c in FLAG_CASES for cmd in ("quantize", "measure")
     if cmd == "quantize" or "--eval" not in FLAG_CASES[c][0]],  # measure does not evaluate
)  # fmt: skip
def test_calibration_errors_name_flags_that_exist(
    case, command, tiny_model_dir, tmp_path, no_model_load, capsys
):
    """Errors said --end for --calib-end, --start for --calib-start, and blamed --calib's text
    for too many --eval-windows."""
    extra, flag = FLAG_CASES[case]
    argv = [command, tiny_model_dir, "--nsamples", "4", "--seqlen", "32", *extra]
    if command == "measure":
        argv += ["--output", tmp_path / "m.safetensors"]
    elif "--eval" not in extra:
        argv += ["--eval", "none"]
    err = fails(capsys, argv)
    named = set(re.findall(r"--[a-z][a-z-]*", err))
    assert flag in named and named <= accepted_flags(command), err


def test_eval_errors_name_flags_that_exist(tiny_model_dir, no_model_load, capsys):
    err = fails(capsys, ["eval", tiny_model_dir, *EVAL32, "--eval-windows", "100000"])
    named = set(re.findall(r"--[a-z][a-z-]*", err))
    assert "--eval-windows" in named and named <= accepted_flags("eval"), err


FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_while_checkpointing_keeps_the_resume_hint(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """safetensors reports a full disk as its own error type: writing a checkpoint block gave a
    traceback, and the final save's error no --resume hint."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def second_block_fills_the_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a block")
            raise SafetensorError(FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", second_block_fills_the_disk)
    out = tmp_path / "out"
    err = fails(capsys, ["quantize", tiny_model_dir, "--output", out, "--method", "gptq", *QUICK])
    partial = tmp_path / "out.partial"
    assert err == (
        f"baq: error: {partial / 'block-00001.safetensors'}: No space left on device; free some "
        f"disk space and rerun with --resume (the checkpoint is {partial})"
    )
    assert sorted(p.name for p in partial.iterdir()) == [
        "block-00000.json", "block-00000.safetensors", "pid", "run.json"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"]


def test_a_full_disk_at_the_final_save_keeps_the_resume_hint(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(FULL)

    monkeypatch.setattr(storage, "save_file", full)
    out = tmp_path / "out"
    err = fails(capsys, ["quantize", tiny_model_dir, "--output", out, "--method", "gptq", *QUICK])
    assert err.startswith(f"baq: error: cannot save {out}: {FULL}; ")
    partial = tmp_path / "out.partial"
    assert err.endswith(f"disk space and rerun with --resume (the checkpoint is {partial})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"]


HOLDER = """
import sys
from pathlib import Path
from baq.run.checkpoint import claim
fd = claim(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin
"""


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_on_one_output_is_told_another_run_holds_it(
    resume, tiny_model_dir, tmp_path, no_model_load, capsys
):
    """Another process holds OUTPUT.partial (the first run, still working): the second is told
    so, with its pid, whether or not it asks to --resume; nothing in the folder changes."""
    import subprocess
    import sys

    from baq.run.checkpoint import partial_dir, write_json

    out = tmp_path / "out"
    partial = partial_dir(out)
    partial.mkdir()
    write_json(partial / "run.json", {"version": 1})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(partial)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "held"
        before = snapshot(partial)
        argv = ["quantize", tiny_model_dir, "--output", out, *QUICK]
        err = fails(capsys, argv + (["--resume"] if resume else []))
        assert snapshot(partial) == before
    finally:
        first.communicate("")
    assert err == (
        f"baq: error: {out.absolute()} is being written by another baq run (pid {first.pid}), "
        f"which holds {partial}: wait for it to finish, or choose another --output"
    )


def test_a_run_that_died_leaves_no_lock(tiny_model_dir, tmp_path, no_model_load, capsys):
    """flock locks end with their process: a killed run's checkpoint asks for --resume, its
    stale pid file notwithstanding."""
    from baq.run.checkpoint import PID_FILE, partial_dir, write_json

    partial = partial_dir(tmp_path / "out")
    partial.mkdir()
    write_json(partial / "run.json", {"version": 1})
    (partial / PID_FILE).write_text("999999999\n")
    err = fails(capsys, ["quantize", tiny_model_dir, "--output", tmp_path / "out", *QUICK])
    assert "holds an interrupted run: add --resume" in err and "another baq run" not in err
