"""Bad inputs end ``baq`` with one line on stderr naming the problem and the fix, exit code 2
(130 for Ctrl-C), before any weights are loaded where that is possible, and leave no output."""

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from baq.cli import build_parser, main
from helpers import corpus, make_tiny_llama, make_tokenizer


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(20_000))
    return path


def fails(capsys, argv, code=2):
    """Run ``baq argv``; check the exit code and that stderr is one ``baq:`` line; return it."""
    capsys.readouterr()  # drop what building the fixtures printed (progress bars)
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def nothing_written(folder: Path, *names: str) -> None:
    """None of ``names`` exists in ``folder``, nor any temp folder of a save."""
    for name in names:
        assert not (folder / name).exists(), name
        assert not list(folder.glob(f".{name}.tmp-*")), f"temp folder of {name} left behind"


def deny(monkeypatch, path: Path, mode: int) -> None:
    """Make ``os.access`` report ``mode`` as denied on ``path`` (as for a non-root user)."""
    real = os.access

    def access(p, m, *a, **k):
        if Path(p).absolute() == path.absolute() and m & mode:
            return False
        return real(p, m, *a, **k)

    monkeypatch.setattr(os, "access", access)


def model_folder(path: Path, weights: bool = True, tokenizer: bool = True) -> Path:
    """A folder with a tiny Llama's config (and, if asked, weights and tokenizer)."""
    model = make_tiny_llama()
    path.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return path


def stub_folder(path: Path, config) -> Path:
    """A folder with ``config``, a stub weights file and a tokenizer: enough to pass the name
    checks, never loaded."""
    path.mkdir(parents=True)
    config.save_pretrained(path)
    save_file({"stub": torch.zeros(1)}, str(path / "model.safetensors"))
    make_tokenizer().save_pretrained(path)
    return path


QUICK = ["--nsamples", "4", "--seqlen", "32", "--eval", "none", "-q"]


# 1. missing or unreadable model path


def test_missing_model_path(tmp_path, no_model_load, capsys):
    err = fails(capsys, ["quantize", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert f"model folder {tmp_path / 'nope'} does not exist: check the path" in err
    err = fails(capsys, ["quantize", str(tmp_path / "nope.gguf")])
    assert "nope.gguf does not exist" in err
    nothing_written(tmp_path, "out")


def test_unreadable_model_path(tmp_path, tiny_model_dir, monkeypatch, no_model_load, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "config.json"
    config.chmod(0)
    try:
        if os.access(config, os.R_OK):  # root reads anything: pretend it cannot
            deny(monkeypatch, config, os.R_OK)
        err = fails(capsys, ["quantize", str(folder), "--output", str(tmp_path / "out")])
    finally:
        config.chmod(0o644)
    assert f"model {config}: permission denied" in err and "chmod" in err
    nothing_written(tmp_path, "out")


def test_unreadable_model_path_real_permissions(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").chmod(0)
    try:
        if os.access(folder / "config.json", os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        err = fails(capsys, ["quantize", str(folder)])
    finally:
        (folder / "config.json").chmod(0o644)
    assert "permission denied" in err


# 2. a folder that is not a model


def test_folder_that_is_not_a_model(tmp_path, no_model_load, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = fails(capsys, ["quantize", str(empty)])
    assert f"{empty} has no config.json: give a folder written by save_pretrained" in err

    ggufs = tmp_path / "ggufs"
    ggufs.mkdir()
    (ggufs / "m.gguf").write_bytes(b"GGUF")
    assert "add --gguf-file m.gguf" in fails(capsys, ["quantize", str(ggufs)])

    no_weights = model_folder(tmp_path / "no-weights", weights=False)
    err = fails(capsys, ["quantize", str(no_weights)])
    assert f"{no_weights} has a config.json but no weights (model.safetensors" in err
    assert "save_pretrained" in err

    no_tokenizer = model_folder(tmp_path / "no-tokenizer", tokenizer=False)
    err = fails(capsys, ["eval", str(no_tokenizer)])
    assert f"{no_tokenizer} has no tokenizer files" in err
    assert "tokenizer.save_pretrained" in err


# 3. an architecture with no recognisable blocks


def test_not_a_causal_lm(tmp_path, no_model_load, capsys):
    from transformers import T5Config

    config = T5Config(
        d_model=8, d_ff=16, num_layers=1, num_heads=1, architectures=["T5ForConditionalGeneration"]
    )
    folder = stub_folder(tmp_path / "t5", config)
    err = fails(capsys, ["quantize", str(folder), "--output", str(tmp_path / "out")])
    assert "T5ForConditionalGeneration (model type 't5') is not a causal language model" in err
    assert "decoder-only" in err
    nothing_written(tmp_path, "out")


def test_causal_lm_without_decoder_blocks(tmp_path, no_model_load, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    class BlocklessConfig(PretrainedConfig):
        model_type = "baq-test-blockless"

    class BlocklessForCausalLM(PreTrainedModel):
        config_class = BlocklessConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16)

    AutoConfig.register("baq-test-blockless", BlocklessConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlocklessConfig, BlocklessForCausalLM, exist_ok=True)
    folder = stub_folder(tmp_path / "blockless", BlocklessConfig())
    err = fails(capsys, ["quantize", str(folder), "--report", str(tmp_path / "r.json")])
    assert "no decoder blocks found in BlocklessForCausalLM" in err
    assert "baq.model.blocks.BLOCK_PATHS" in err
    nothing_written(tmp_path, "r.json")


# 4. a GGUF file of an unsupported type


def test_gguf_with_garbage_bytes(tmp_path, no_model_load, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model\x00\x01")
    err = fails(capsys, ["quantize", str(bad), "--output", str(tmp_path / "out")])
    assert f"{bad} is not a GGUF file (it starts with b'this', not b'GGUF')" in err
    assert "give a .gguf file" in err
    # the same file named inside a folder with --gguf-file
    err = fails(capsys, ["eval", str(tmp_path), "--gguf-file", "bad.gguf"])
    assert f"{bad} is not a GGUF file" in err
    nothing_written(tmp_path, "out")


def test_gguf_of_an_architecture_transformers_cannot_load(tmp_path, no_model_load, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "frob.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = fails(capsys, ["quantize", str(path), "--output", str(tmp_path / "out")])
    assert f"cannot read the config of {path}" in err
    assert "architecture frobnicator is not supported" in err
    assert "safetensors folder or hub id" in err
    nothing_written(tmp_path, "out")


# 5. weights with NaN or Inf


@pytest.fixture
def nan_model_dir(tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    path = tmp_path / "nan-model"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_nan_weights_are_named_right_after_the_load(nan_model_dir, text_file, tmp_path, capsys):
    argv = ["quantize", str(nan_model_dir), "--calib", str(text_file), *QUICK]
    argv += ["--output", str(tmp_path / "out"), "--report", str(tmp_path / "report.json")]
    err = fails(capsys, argv)
    assert err == (
        "baq: error: weight model.layers.1.mlp.down_proj.weight holds 2 NaN/Inf values: "
        "the checkpoint is damaged; re-download or re-export the model"
    )
    nothing_written(tmp_path, "out", "out.partial", "report.json")


def test_nan_weights_met_by_the_solver_are_one_line(
    nan_model_dir, text_file, tmp_path, monkeypatch, capsys
):
    from baq.cli import common

    monkeypatch.setattr(common, "check_finite_weights", lambda model: None)
    argv = ["quantize", str(nan_model_dir), "--calib", str(text_file), *QUICK]
    err = fails(capsys, [*argv, "--report", str(tmp_path / "report.json")])
    assert "weight model.layers.1.mlp.down_proj contains 2 NaN/Inf values" in err
    nothing_written(tmp_path, "report.json")


# 6. a calibration (or evaluation) text too short for its windows


def test_text_too_short_for_the_windows(tiny_model_dir, tmp_path, no_model_load, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the of and to a in is that for it as with be by on not this\n")
    argv = ["quantize", str(tiny_model_dir), "--calib", str(short), "--seqlen", "64"]
    argv += ["--eval", "none"]
    err = fails(capsys, [*argv, "--output", str(tmp_path / "out")])
    assert re.search(
        rf"--calib {short}: the text has 17 tokens; 64-token windows starting at token 0 "
        r"need at least 65: use a longer text, a smaller --seqlen",
        err,
    ), err
    err = fails(capsys, [*argv, "--calib-start", "10", "--seqlen", "8"])
    assert "the text has 17 tokens; 8-token windows starting at token 10 need at least 19" in err

    err = fails(
        capsys,
        ["eval", str(tiny_model_dir), "--eval", str(short), "--eval-seqlen", "8"]
        + ["--eval-windows", "3"],
    )
    assert f"--eval {short}: the text has 17 tokens; 3 windows of 8 need 24" in err
    nothing_written(tmp_path, "out")


# 7. empty and binary text files


TEXTS = {
    "empty": (b"", "holds no text: give a non-empty file"),
    "blank": (b"  \n\n\t\n", "holds no text: give a non-empty file"),
    "nul": (b"some text\x00\x00more", "is binary (contains NUL bytes): give a UTF-8 text file"),
    "latin1": (
        "caf\xe9 cr\xe8me".encode("latin-1"),
        "is not UTF-8 text (bad byte at offset 3): give a UTF-8 text file",
    ),
}


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
@pytest.mark.parametrize("kind", list(TEXTS))
def test_empty_or_binary_text_files(kind, flag, tiny_model_dir, tmp_path, no_model_load, capsys):
    raw, message = TEXTS[kind]
    path = tmp_path / f"{kind}.txt"
    path.write_bytes(raw)
    argv = ["quantize", str(tiny_model_dir), flag, str(path), "--output", str(tmp_path / "out")]
    assert fails(capsys, argv) == f"baq: error: {flag} {path} {message}"
    if flag == "--eval":
        assert fails(capsys, ["eval", str(tiny_model_dir), "--eval", str(path)]).endswith(message)
    nothing_written(tmp_path, "out")


# 8. --bits out of range or beyond the level cap


BITS = [
    (["--bits", "9"], "--bits=9.0: use a value in [1, 8] (8 bits = 256 levels is the most)"),
    (["--bits", "0"], "--bits=0.0: use a value in [1, 8]"),
    (["--bits", "nan"], "--bits=nan: use a number in [1, 8]"),
    (
        ["--bits", "8", "--max-levels", "16"],
        "--bits=8.0 cannot be reached with max_levels=16 (at most log2(16) = 4 bits per column): "
        "lower --bits to 4 or raise --max-levels to 256",
    ),
    (["--bits", "4.5", "--max-levels", "16"], "raise --max-levels to 32"),
    (["--max-levels", "1"], "--max-levels=1: use a value in [2, 65536]"),
    (["--min-levels", "0"], "--min-levels=0: use an integer in [1, max_levels=256]"),
    (["--bits", "1", "--min-levels", "4"], "--bits=1.0 is below the floor of min_levels=4"),
    (["--method", "rtn", "--bits", "2.5"], "use an integer, or --method baq"),
    (["--dim", "ic", "--clip"], "use --dim oc or auto with --clip, or drop --clip"),
]


@pytest.mark.parametrize("extra,message", BITS, ids=[" ".join(b[0]) for b in BITS])
def test_bits_out_of_range(extra, message, tiny_model_dir, no_model_load, capsys):
    assert message in fails(capsys, ["quantize", str(tiny_model_dir), *extra])


# 9. --group-size: a ragged last group works; zero or negative is an error


@pytest.mark.parametrize("size", ["0", "-3"])
def test_group_size_must_be_positive(size, tiny_model_dir, no_model_load, capsys):
    err = fails(capsys, ["quantize", str(tiny_model_dir), "--group-size", size])
    assert f"--group-size={size}: use a positive integer" in err


def test_group_size_that_does_not_divide_the_columns(tiny_model_dir, text_file, tmp_path):
    from baq.saved.packed_linear import PackedLinear
    from baq.saved.storage import load_quantized

    out = tmp_path / "ragged"
    argv = ["quantize", str(tiny_model_dir), "--method", "gptq", "--bits", "2"]
    argv += ["--group-size", "48", "--calib", str(text_file), *QUICK, "--output", str(out)]
    assert main(argv) == 0
    model, _ = load_quantized(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        # (rows, cols) in the codes' basis (rotated by default); cols 64 or 128: never a
        # multiple of 48
        W = layer.dequantize(rotated=True)
        cols = W.shape[1]
        starts = list(range(0, cols, 48))
        assert cols % 48 and layer.lo_bits.shape == (W.shape[0], len(starts)), name
        for s in starts:  # the last group is the short one: 16 or 32 columns
            for row in W[:, s : s + 48]:
                assert row.unique().numel() <= 4, (name, s)  # 2 bits: at most 4 values


def test_group_size_help_and_readme_document_the_ragged_group():
    sub = build_parser()._subparsers._group_actions[0].choices["quantize"]
    assert "the last group is shorter" in " ".join(sub.format_help().split())
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "ragged last group" in readme


# 10. an output that exists, is not writable, or has no parent


def test_output_exists_without_force(tiny_model_dir, tmp_path, no_model_load, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = fails(capsys, ["quantize", str(tiny_model_dir), "--output", str(out)])
    assert err == f"baq: error: --output {out}: already exists; add --force to replace it"
    err = fails(capsys, ["quantize", str(tiny_model_dir), "--output", str(out), "--force"])
    assert "is not a baq model folder (no manifest.json)" in err and "choose another name" in err
    assert (out / "mine.txt").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = fails(capsys, ["quantize", str(tiny_model_dir), "--output", str(afile), "--force"])
    assert "exists and is not a folder" in err


def test_output_parent_does_not_exist(tiny_model_dir, tmp_path, no_model_load, capsys):
    out = tmp_path / "missing" / "out"
    err = fails(capsys, ["quantize", str(tiny_model_dir), "--output", str(out)])
    assert f"parent folder {tmp_path / 'missing'} does not exist; create it first" in err
    assert not (tmp_path / "missing").exists()


def test_output_in_a_read_only_folder(tiny_model_dir, tmp_path, monkeypatch, no_model_load, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: pretend it cannot
            deny(monkeypatch, ro, os.W_OK)
        err = fails(capsys, ["quantize", str(tiny_model_dir), "--output", str(ro / "out")])
        assert f"--output {ro / 'out'}: cannot write in {ro} (permission denied)" in err
        err = fails(capsys, ["quantize", str(tiny_model_dir), "--report", str(ro / "r" / "x.json")])
        assert f"--report {ro / 'r' / 'x.json'}: cannot write in {ro} (permission denied)" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_output_in_a_read_only_folder_real_permissions(tiny_model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        err = fails(capsys, ["quantize", str(tiny_model_dir), "--output", str(ro / "out")])
        assert "permission denied" in err
    finally:
        ro.chmod(0o700)


# 11. the disk fills up during the save


def test_disk_full_during_save(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    from baq.saved import storage

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "save_file", full)
    out = tmp_path / "out"
    argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--calib", str(text_file)]
    argv += [*QUICK, "--output", str(out), "--report", str(tmp_path / "report.json")]
    err = fails(capsys, argv)
    assert err.startswith(f"baq: error: cannot save {out}: No space left on device; ")
    assert "free some disk space" in err
    nothing_written(tmp_path, "out", "report.json")
    # the only thing kept is the resume checkpoint, which the message names
    assert {p.name for p in tmp_path.iterdir()} <= {"corpus.txt", "out.partial"}
    if (tmp_path / "out.partial").exists():
        assert f"rerun with --resume (the checkpoint is {tmp_path / 'out.partial'})" in err


# 12. Ctrl-C


def test_ctrl_c_during_quantization(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    from baq.run import quantization

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantization, "quantize_layer", interrupt)
    out = tmp_path / "out"
    argv = ["quantize", str(tiny_model_dir), "--calib", str(text_file), *QUICK]
    err = fails(capsys, [*argv, "--report", str(tmp_path / "report.json")], code=130)
    assert err == "baq: interrupted"
    err = fails(capsys, [*argv, "--output", str(out)], code=130)
    assert err.startswith(f"baq: interrupted; nothing was saved to {out}")
    nothing_written(tmp_path, "out", "report.json")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "x", "--cache", "fast"], "argument --cache: invalid choice: 'fast'"),
        (["quantize", "--method", "foo"], "argument --method: invalid choice: 'foo'"),
        (["generate"], "the following arguments are required: prompt"),
        (["quantize", "--nope"], "unrecognized arguments: --nope"),
    ],
    ids=["choice", "method", "missing", "unknown"],
)
def test_argparse_errors_are_one_line_exit_2(argv, message, no_model_load, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: error: ") and "\n" not in err, err
    assert message in err and err.endswith("-h')")


def test_python_dash_m_baq_is_the_command_line(tmp_path):
    """``python -m baq`` runs the same parser: a bad argument exits 2 with the one-line error."""
    import subprocess
    import sys

    missing = tmp_path / "nowhere"
    run = subprocess.run(
        [sys.executable, "-m", "baq", "inspect", str(missing)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert str(missing) in run.stderr and "Traceback" not in run.stderr
