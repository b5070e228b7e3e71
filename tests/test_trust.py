"""Nothing lost, nothing trusted (issue 29): baq replaces only its own saves, writes only regular
files, and checks everything it reads from a saved folder, a checkpoint or a measurement.

Every refusal is one line (exit code 2 at the command line) that names the problem and the fix,
and leaves nothing half-written; the data-loss cases check the foreign folder byte for byte.
"""

import json
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
