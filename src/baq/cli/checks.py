"""Checks that run before a model is loaded, and the one-line messages of bad input.

Every function here reads configs, file headers or a tokenizer at most, never weights, so a bad
argument fails in a second with a line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import HUB_TEXT_SOURCES, TEXT_FILE_SUFFIXES, TEXT_SOURCES
from ..errors import one_line

log = logging.getLogger("baq")


# Weight files transformers loads from a folder (sharded checkpoints have an index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# No tokenizer makes fewer than one token per this many characters: a text this much longer
# than the tokens its windows need surely fits, and is not tokenized twice to find out.
CHARS_PER_TOKEN_MAX = 16


class UsageError(ValueError):
    """A bad argument or input: one line, exit code 2."""


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"--{name}={value}: use a positive integer")


def check_source(src: str, flag: str) -> None:
    if src in TEXT_SOURCES:
        return
    path = Path(src)
    if path.suffix not in TEXT_FILE_SUFFIXES:
        raise UsageError(
            f"{flag} {src}: not a known source; use one of {', '.join(TEXT_SOURCES)} "
            "or a .txt/.jsonl file"
        )
    if not path.is_file():
        raise UsageError(f"{flag} {src}: file not found")
    check_text_file(path, flag)


def check_text_file(path: Path, flag: str) -> None:
    """A text file must be readable, UTF-8 without NUL bytes, and hold some text."""
    from .. import data

    try:
        data.load_text(str(path))
    except OSError as err:
        raise UsageError(
            f"{flag} {path}: cannot read it ({err.strerror or err}): check its permissions"
        ) from None
    except ValueError as err:
        raise UsageError(f"{flag} {one_line(err)}") from None


def is_saved_folder(model: str | None) -> bool:
    return model is not None and (Path(model) / "manifest.json").is_file()


def refuse_saved_model(model: str | None, command: str = "quantize") -> None:
    """``baq quantize`` and ``baq measure`` read a float model: a baq save (its manifest, or a
    config.json whose quantization_config is baq's) is refused in one line saying what to do."""
    import json

    from baq.saved.manifest import FORMAT, is_baq_save

    if model is None:
        return
    path = Path(model).expanduser()
    saved = is_baq_save(path)
    if not saved and (path / "config.json").is_file():
        try:
            qc = json.loads((path / "config.json").read_text(encoding="utf-8"))
            saved = qc.get("quantization_config", {}).get("quant_method") == FORMAT
        except (OSError, ValueError, AttributeError):
            saved = False
    if saved:
        raise UsageError(
            f"{model} is a baq save, already quantized: {command} the original model, or "
            f"write plain weights with 'baq export {model} --output DIR' first"
        )


def check_readable(path: Path) -> None:
    """A local model file or folder must be readable (a folder also listable)."""
    unreadable = [
        p
        for p in (path, path / "config.json")
        if p.exists() and not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0))
    ]
    if unreadable:
        raise UsageError(
            f"model {unreadable[0]}: permission denied; make it readable "
            f"(chmod -R u+rX {path}) or copy the model somewhere you can read"
        )


def check_model_folder(folder: Path) -> None:
    """A model folder must hold weights and a tokenizer next to its config.json (checked by
    name, before transformers reads anything; a missing config.json is reported by models)."""
    from baq.model.loader import has_tokenizer_files

    if not (folder / "config.json").is_file():
        return
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(
        folder.glob("*.safetensors")
    ):
        raise UsageError(
            f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): "
            "save the model into it with model.save_pretrained(folder)"
        )
    if not has_tokenizer_files(folder):
        raise UsageError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): "
            "save one into it with tokenizer.save_pretrained(folder)"
        )


def check_model_path(model: str | None, gguf_file: str | None) -> None:
    """Local paths: readable, and a folder holds a model. A path that does not exist is
    reported by ``models`` (or read as a hub id)."""
    if model is None:
        return
    path = Path(model).expanduser()
    if not path.exists():
        return
    check_readable(path)
    if gguf_file is not None and path.is_dir():
        check_readable(path / gguf_file)
    if path.is_dir() and gguf_file is None:
        check_model_folder(path)


def check_model(args: argparse.Namespace, *seqlens: int) -> Any:
    """Resolve the model and read only its config: bad paths, architectures without decoder
    blocks and too-long windows fail here, before the weights are loaded. A saved baq folder is
    checked by its manifest instead."""
    from baq.model import loader

    if is_saved_folder(args.model):
        return None
    check_model_path(args.model, args.gguf_file)
    config = loader.load_config(args.model, args.gguf_file)
    loader.check_architecture(config)
    limit = loader.max_positions(config)
    for n in seqlens:
        if limit is not None and n > limit:
            raise UsageError(
                f"sequence length {n} exceeds the model's {limit} positions: lower --seqlen "
                "or --eval-seqlen"
            )
    return config


def eval_sources(args: argparse.Namespace) -> list[str]:
    sources = args.eval if args.eval is not None else args.eval_default
    return [] if sources == ["none"] else sources


def tokenizer_only(args: argparse.Namespace) -> Any:
    """The model's tokenizer without its weights (loaded once per command)."""
    from baq.model import loader

    if getattr(args, "tokenizer_only", None) is None:
        args.tokenizer_only = loader.load_tokenizer(args.model, args.gguf_file)
    return args.tokenizer_only


def check_text_fits(
    args: argparse.Namespace, src: str, flag: str, needed: int, cut: Callable[[Any], Any]
) -> None:
    """A local text that may hold fewer tokens than its windows need is tokenized now, with the
    tokenizer alone, and ``cut`` (a ``data`` windowing call) says whether it fits."""
    from .. import data

    if src in HUB_TEXT_SOURCES or is_saved_folder(args.model):
        return
    text = data.load_text(src)
    if len(text) >= CHARS_PER_TOKEN_MAX * needed:
        return
    tokens = data.tokenize(tokenizer_only(args), text)
    try:
        cut(tokens)
    except ValueError as err:
        raise UsageError(f"{flag} {src}: {one_line(err)}") from None


def calib_fit_error(calib: Any, ntokens: int, eval_note: str | None = None) -> str | None:
    """Why ``calib``'s windows (a ``CalibConfig``) do not fit a text of ``ntokens`` tokens, in
    the flags the user typed (:func:`baq.data.calibration_windows`' rule); None when they fit.

    Args:
        eval_note: how the start was derived from the evaluation (``--eval-windows N x
            --eval-seqlen S``), or None when it is ``--calib-start`` or 0.
    """
    if calib.end is not None and calib.end > ntokens:
        return f"--calib-end={calib.end} is past the end of the text ({ntokens} tokens): lower it"
    stop = ntokens if calib.end is None else calib.end
    if stop - calib.start > calib.seqlen:
        return None
    need = calib.start + calib.seqlen + 1
    before = "" if calib.end is None else f" before --calib-end={calib.end}"
    if eval_note:
        return (
            f"calibration starts after the evaluated windows ({eval_note} = {calib.start} "
            f"tokens), and {calib.seqlen}-token windows then need {need} tokens{before}; the "
            f"text has {ntokens}: lower --eval-windows, or calibrate on another text (--calib)"
        )
    earlier = " or an earlier --calib-start" if calib.start else ""
    return (
        f"the text has {ntokens} tokens; {calib.seqlen}-token windows starting at token "
        f"{calib.start}{before} need at least {need}: use a longer text, a smaller --seqlen"
        f"{earlier}"
    )


def eval_note(args: argparse.Namespace, start: int) -> str | None:
    """How a calibration start came from the evaluation windows (for the errors), or None."""
    if getattr(args, "calib_start", None) is not None or not start:
        return None
    return f"--eval-windows {args.eval_windows} x --eval-seqlen {args.eval_seqlen}"


def check_calib_fits(args: argparse.Namespace, calib: Any) -> None:
    """The calibration text holds enough tokens for ``calib`` (a ``CalibConfig``)."""
    needed = calib.end if calib.end is not None else calib.start + calib.seqlen + 1

    def cut(tokens: Any) -> None:
        why = calib_fit_error(calib, int(tokens.numel()), eval_note(args, calib.start))
        if why is not None:
            raise ValueError(why)

    check_text_fits(args, calib.source, "--calib", needed, cut)


def check_eval_fits(args: argparse.Namespace) -> None:
    """Every evaluation text holds enough tokens for its windows."""
    seqlen, n = args.eval_seqlen, args.eval_windows or 1

    def cut(tokens: Any) -> None:
        if tokens.numel() < n * seqlen:
            raise ValueError(
                f"the text has {tokens.numel()} tokens; {n} windows of {seqlen} need "
                f"{n * seqlen}: use a longer text, fewer --eval-windows or a smaller --eval-seqlen"
            )

    for src in eval_sources(args):
        check_text_fits(args, src, "--eval", seqlen * n, cut)


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_folder(output: Path, force: bool) -> None:
    """``--output``: new (or, with --force, an empty folder or a previous baq save: never a
    folder baq did not write, a link, a FIFO or a device), in a writable folder."""
    from baq.atomic import path_kind
    from baq.saved.manifest import replaceable

    target = output.expanduser().absolute()
    kind = path_kind(target)
    if kind not in (None, "a folder"):
        raise UsageError(
            f"--output {output}: is {kind}, not a folder; baq writes only new folders or its "
            "own saves: choose another name"
        )
    if target.exists():
        if not force:
            raise UsageError(f"--output {output}: already exists; add --force to replace it")
        if not target.is_dir():
            raise UsageError(
                f"--output {output}: exists and is not a folder; delete it or choose another name"
            )
        why = replaceable(target)
        if why is not None:
            detail = why.removeprefix("not a baq model folder ")
            raise UsageError(
                f"--output {output}: is not a baq model folder {detail}, and --force replaces "
                "only a previous baq save; choose another name"
            )
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(
            f"--output {output}: parent folder {parent} does not exist; create it first "
            "or choose another folder"
        )
    if not writable(parent):
        raise UsageError(
            f"--output {output}: cannot write in {parent} (permission denied); "
            "choose a folder you can write to"
        )


def check_report_file(report: Path, flag: str = "--report") -> None:
    """``--report`` (or ``flag``): a file name (new, or a regular file: never a link, FIFO or
    device) whose nearest existing folder is writable."""
    from baq.atomic import UnsafeOutput, check_output_file

    if report.is_dir() and not report.is_symlink():
        raise UsageError(f"{flag} {report}: is a folder; give a file name")
    try:
        check_output_file(report.expanduser(), flag)
    except UnsafeOutput as err:
        raise UsageError(str(err)) from None
    folder = report.expanduser().absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {report}: {folder} is a file, not a folder; choose another path")
    if not writable(folder):
        raise UsageError(
            f"{flag} {report}: cannot write in {folder} (permission denied); "
            "choose a folder you can write to"
        )


def check_finite_weights(model: Any) -> None:
    """Every floating weight is finite: a damaged checkpoint fails right after the load, naming
    the tensor, instead of deep inside a solve."""
    import torch

    for name, param in model.named_parameters():
        if param.device.type == "meta":  # a lazily loaded block: checked per layer when solved
            continue
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(
                f"weight {name} holds {bad} NaN/Inf values: the checkpoint is damaged; "
                "re-download or re-export the model"
            )


def no_space(err: BaseException) -> bool:
    """The error, or one it was raised from, is a full disk (or quota)."""
    from baq.atomic import os_errno

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if os_errno(err) in (errno.ENOSPC, errno.EDQUOT):  # safetensors' errors included
            return True
        err = err.__cause__ or err.__context__
    return False


def kept_checkpoint(args: argparse.Namespace) -> Path | None:
    """The ``OUTPUT.partial`` checkpoint an interrupted or failed run left, if any."""
    output = getattr(args, "output", None)
    if output is None:
        return None
    from baq.run.checkpoint import partial_dir

    partial = partial_dir(output)
    return partial if partial.is_dir() else None


def error_line(err: BaseException, args: argparse.Namespace) -> str:
    """The one line ``baq: error:`` prints, with the fix for a full disk or memory."""
    from baq.run.memory_estimate import memory_error_line, out_of_memory

    if out_of_memory(err):
        return memory_error_line(err, kept_checkpoint(args))
    text = one_line(err)
    if no_space(err):
        name = getattr(err, "filename", None)  # which write filled the disk
        if name and str(name) not in text:
            text = f"{name}: {text}"
        partial = kept_checkpoint(args)
        if partial is None:
            text += "; free some disk space, or choose an --output on another disk"
        else:
            text += f"; free some disk space and rerun with --resume (the checkpoint is {partial})"
    return text


def interrupted_line(args: argparse.Namespace) -> str:
    """The one line printed on Ctrl-C."""
    output = getattr(args, "output", None)
    text = "interrupted"
    if output is not None and not output.exists():
        text += f"; nothing was saved to {output}"
    partial = kept_checkpoint(args)
    if partial is not None:
        text += f"; rerun with --resume to continue from the checkpoint in {partial}"
    return text


def flagify(msg: str) -> str:
    """``group_size=0: ...`` -> ``--group-size=0: ...``: errors name the flag the user typed."""
    head, sep, tail = msg.partition("=")
    if sep and head.isidentifier():
        return f"--{head.replace('_', '-')}={tail}"
    return msg


def check_saved_layers(root: Path) -> None:
    """What ``baq eval`` checks in a saved folder before it builds a layer, for ``baq inspect``:
    the manifest (sizes, SHA-256), the headers and the layers' metadata, then every packed
    layer's tensors (:func:`baq.saved.packing.read_layer`: the level-class table, ranges,
    permutation, stream sizes and codes) and no tensor left over. One layer is read at a time.

    Raises:
        StorageError: one line naming the file, the layer and the problem.
    """
    from safetensors import SafetensorError, safe_open

    from baq.saved.headers import packed_layers, weight_headers
    from baq.saved.manifest import QUANTIZED_FILE, StorageError, verify_manifest
    from baq.saved.packing import range_groups, read_layer

    listed = verify_manifest(root)["files"]
    headers = weight_headers(root, QUANTIZED_FILE, listed)
    layers = packed_layers(root, headers)
    for rel, (_, info) in headers.items():
        path = root / rel
        mine = {n: m for n, m in layers.items() if m["file"] == rel}
        # a tensor belongs to the layer whose name prefixes it (module names nest by dots)
        owner = {k: max((n for n in mine if k.startswith(n + ".")), key=len, default=None)
                 for k in info}  # fmt: skip
        left = sorted(k for k, n in owner.items() if n is None)
        if left:
            raise StorageError(f"{path}: unexpected tensor {left[0]}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name, m in mine.items():
                    tensors = {k: f.get_tensor(k) for k, n in owner.items() if n == name}
                    try:
                        ngroups = range_groups(m["shape"], m["group_size"], m["dim"])
                        read_layer(name, tensors, m["shape"], ngroups, m["dim"])
                    except ValueError as err:
                        raise StorageError(f"{path}: {one_line(err)}") from None
                    if tensors:
                        raise StorageError(f"{path}: unexpected tensor {sorted(tensors)[0]}")
        except (OSError, SafetensorError) as err:
            raise StorageError(f"{path}: {one_line(err)}") from err
