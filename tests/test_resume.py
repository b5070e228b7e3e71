"""Interrupted runs resume to the bytes an uninterrupted run writes (runs that survive)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from baq.cli import main
from helpers import corpus, folder_bytes, make_tiny_llama, make_tokenizer

# the child quantizes with the real CLI and SIGKILLs itself right after checkpointing block 1
KILLER = """
import os, signal, sys
from baq.run import checkpoint
from baq.cli import main

save = checkpoint.Checkpoint.save_block

def save_then_die(self, index, results, records):
    save(self, index, results, records)
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.Checkpoint.save_block = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir = root / "tiny4"
    make_tiny_llama(layers=4).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = root / "corpus.txt"
    text.write_text(corpus(100_000))
    return root, model_dir, text


def argv(setup, out: Path, *extra: str) -> list[str]:
    root, model_dir, text = setup
    return [
        "quantize", str(model_dir), "-q", "--method", "baq", "--bits", "2.5", "--calib",
        str(text), "--nsamples", "8", "--seqlen", "32", "--eval", "none", "--device", "cpu",
        "--output", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(setup):
    out = setup[0] / "uninterrupted"
    assert main(argv(setup, out)) == 0
    assert not Path(f"{out}.partial").exists()  # the checkpoint goes once the save lands
    return folder_bytes(out)


def test_same_settings_give_the_same_bytes_run_after_run(setup, reference):
    out = setup[0] / "again"
    assert main(argv(setup, out)) == 0
    assert folder_bytes(out) == reference


def test_killed_run_resumes_to_identical_bytes(setup, reference, capsys):
    out = setup[0] / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.run([sys.executable, "-c", KILLER, *argv(setup, out)], env=env)
    assert child.returncode == -9  # really killed, mid-run
    partial = Path(f"{out}.partial")
    assert not out.exists()
    assert sorted(p.name for p in partial.glob("block-*.json")) == [
        "block-00000.json",
        "block-00001.json",
    ]
    # without --resume the leftover checkpoint is refused, not silently overwritten
    assert main(argv(setup, out)) == 2
    assert "--resume" in capsys.readouterr().err
    # a resume with other settings is refused and says what differs
    assert main(argv(setup, out, "--resume", "--percdamp", "0.02")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.percdamp was 0.01, now 0.02" in err

    # ... and so is a resume on other weights, once they are loaded
    other = setup[0] / "tiny4-other"
    if not other.exists():
        make_tiny_llama(layers=4, seed=1).save_pretrained(other)
        make_tokenizer().save_pretrained(other)
    args = argv(setup, out, "--resume")
    args[1] = str(other)
    assert main(args) == 2
    assert "model.sha256" in capsys.readouterr().err

    assert main(argv(setup, out, "--resume")) == 0
    assert folder_bytes(out) == reference
    assert not partial.exists()


def test_resume_without_a_checkpoint_is_refused(setup, capsys):
    assert main(argv(setup, setup[0] / "never", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main([*argv(setup, setup[0] / "x")[:-2], "--resume"]) == 2
    assert "add --output" in capsys.readouterr().err
