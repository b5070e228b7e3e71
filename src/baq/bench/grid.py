"""The ``baq bench`` grid: which runs (:func:`build_grid`), their cache keys and files
(:func:`plan`), and what a cached run still lacks (:func:`missing_sets`). No model is loaded here;
running the grid is bench.py.

A run's key hashes everything that determines its quantized weights (model, dtype, calibration
text by content and windows, the :class:`QuantConfig`), so an extended grid only runs what is
missing and a change of settings never reuses a stale result.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from baq import data
from baq.config import HUB_TEXT_SOURCES, TEXT_FILE_SUFFIXES, QuantConfig

log = logging.getLogger(__name__)

BENCH_VERSION = 2  # 2: evaluation sets cached per run, outside the key
PROTOCOL_CALIB_START = 150_000  # DESIGN.md section 2: calibration never sees tokens 0..65535
REFERENCE_ID = "reference:SmolLM2-135M-Instruct.Q4_1"
DEFAULT_TEXT = Path("..", "shared", "data", "wikitext2-test.txt")

# QuantConfig fields added after bench version 2: in a run's key only when not at this default
KEY_OPTIONAL: dict[str, Any] = {
    "range_dtype": "float16",
    "allocation": "layer",
    "importance": "fisher",
    "importance_samples": 32,  # the default until session 7: keys made before stay valid
    "dim": "oc",
    "include_head": False,
    "measure_samples": None,  # all windows until session 8
    "adadim": "proxy",
    "clip": False,
    "rotate": False,
    "rotate_seed": 0,
}

# family -> (label, QuantConfig fields); the order is the default grid's order
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "fp": ("FP", {}),
    "rtn": ("RTN", {"method": "rtn"}),
    "gptq": ("GPTQ", {"method": "gptq"}),
    # per layer, the paper's budget (allocation is explicit: BAQ's default is the model's)
    "baq-measured": (
        "BAQ measured",
        {"method": "baq", "allocation": "layer", "sensitivity": "measured"},
    ),
    "baq-analytic": (
        "BAQ analytic",
        {"method": "baq", "allocation": "layer", "sensitivity": "analytic"},
    ),
    "baq-int": ("BAQ integer bits", {"method": "baq", "allocation": "layer", "integer_bits": True}),
    # one budget for the whole model (measure.py, plan.py): analytic c_lj, Fisher or noise beta_l
    "baq-model": (
        "BAQ model",
        {"method": "baq", "allocation": "model", "sensitivity": "analytic"},
    ),
    "baq-model-int": (
        "BAQ model integer bits",
        {"method": "baq", "allocation": "model", "sensitivity": "analytic", "integer_bits": True},
    ),
    "baq-model-noise": (
        "BAQ model noise",
        {"method": "baq", "allocation": "model", "sensitivity": "analytic", "importance": "noise"},
    ),
}
# QuantConfig fields that only the model-level allocation reads: not in other runs' keys, so a
# new default of theirs leaves the cached RTN, GPTQ and per-layer BAQ runs valid
MODEL_ONLY = ("importance", "importance_samples", "measure_samples")
# families whose fractional budgets (baq_bits) are run too
FRACTIONAL = ("baq-measured", "baq-model")


@dataclass(frozen=True)
class BenchSpec:
    """One run of the grid: ``name`` like ``baq-measured-g128-3b``; ``cfg`` None for FP."""

    name: str
    family: str
    label: str  # legend and table label, e.g. "GPTQ g128 act"
    cfg: QuantConfig | None


@dataclass(frozen=True)
class BenchSettings:
    """The model and data shared by every run (DESIGN.md section 2 by default)."""

    model: str | None = None  # None: the reference model
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    text: str = "builtin"  # calibration text and first evaluation set
    evals: tuple[str, ...] = ()  # further evaluation sources
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib_start: int | None = None  # None: 150000 if the text is long enough, else after eval
    eval_seqlen: int = 2048
    eval_windows: int = 32

    def __post_init__(self) -> None:
        least = {"nsamples": 1, "eval_windows": 1, "seqlen": 2, "eval_seqlen": 2, "calib_start": 0}
        for name, low in least.items():
            if (value := getattr(self, name)) is not None and value < low:
                raise ValueError(f"{name}={value}: use an integer >= {low}")


@dataclass(frozen=True)
class Entry:
    """A grid run bound to its cache file."""

    spec: BenchSpec
    key: str
    settings: dict[str, Any]  # what the key hashes
    path: Path
    evals: dict[str, str]  # evaluation set name -> text hash, the sets this run must have


def default_text() -> str:
    """``../shared/data/wikitext2-test.txt`` when it exists (the protocol), else ``builtin``."""
    if DEFAULT_TEXT.is_file():
        return str(DEFAULT_TEXT)
    log.warning("%s not found: using the builtin corpus, not the standard protocol", DEFAULT_TEXT)
    return "builtin"


def build_grid(
    families: Sequence[str] = tuple(FAMILIES),
    bits: Sequence[int] = (2, 3, 4),
    baq_bits: Sequence[float] = (2.5,),
    group_size: int | None = None,
    act_order: bool = False,
    percdamp: float = 0.01,
    range_dtype: str = "float16",
    dims: Sequence[str] = ("oc",),
    include_head: bool = False,
    adadim: str = "proxy",
    clip: bool = False,
    rotate: bool = False,
) -> list[BenchSpec]:
    """The runs, in order: each family at each of ``bits`` (BAQ measured also at ``baq_bits``).

    ``group_size`` and ``act_order`` add variants of every quantized run next to the per-row,
    natural-order ones (``-g128``, ``-act`` in the name; RTN has no column order to change).
    ``dims`` repeats every variant on each grid dimension (``-ic``, ``-auto`` in the name; the
    per-OC runs keep their names and cache keys; RTN has no Hessian for ``auto``).
    ``include_head`` quantizes the output head in every quantized run (same names, other keys).
    ``adadim`` is how the ``auto`` runs choose (``-auto-block`` in the name for the block output
    criterion). ``clip`` adds each variant with clipped per-OC ranges (``-clip``; not per-IC,
    whose ranges the solve fits). ``rotate`` adds each variant quantized in the basis of its
    input-side randomized Hadamard transform (``-rot``, before ``-clip``; not with AdaDim's
    block criterion, which rounds the unrotated weights).

    Returns:
        The specs; names are unique. Bad settings raise ``ValueError`` from :class:`QuantConfig`.
    """
    variants: list[tuple[int | None, bool]] = [(None, False)]
    if group_size is not None:
        variants.append((group_size, False))
    if act_order:
        variants += [(None, True)] + ([(group_size, True)] if group_size is not None else [])
    clips = (False, True) if clip else (False,)
    rots = (False, True) if rotate else (False,)
    if adadim != "proxy" and "auto" not in dims:  # it would change no run of the grid
        raise ValueError(
            f"adadim={adadim!r} is how --dim auto chooses, and the grid has no --dim auto: "
            "add --dim auto or drop --adadim"
        )
    grid: dict[str, BenchSpec] = {}
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"method {family!r}: use one of {', '.join(FAMILIES)}")
        label, fields = FAMILIES[family]
        if family == "fp":
            grid["fp"] = BenchSpec("fp", "fp", label, None)
            continue
        budgets = [*bits, *(baq_bits if family in FRACTIONAL else ())]
        for dim in dims:
            for (gs, order), rotated, clipped in (
                (v, r, c) for v in variants for r in rots for c in clips
            ):
                if (order or dim == "auto") and fields["method"] == "rtn":
                    continue
                if (clipped and dim == "ic") or (rotated and dim == "auto" and adadim == "block"):
                    continue
                tag = (
                    ("" if dim == "oc" else f"-{dim}")
                    + ("-block" if dim == "auto" and adadim == "block" else "")
                    + (f"-g{gs}" if gs else "")
                    + ("-act" if order else "")
                    + ("-rot" if rotated else "")
                    + ("-clip" if clipped else "")
                )
                for b in budgets:
                    cfg = QuantConfig(
                        bits=float(b),
                        group_size=gs,
                        act_order=order,
                        percdamp=percdamp,
                        range_dtype=range_dtype,
                        dim=dim,
                        adadim=adadim if dim == "auto" else "proxy",
                        include_head=include_head,
                        clip=clipped,
                        rotate=rotated,
                        **fields,
                    )
                    name = f"{family}{tag}-{float(b):g}b"
                    grid[name] = BenchSpec(name, family, label + tag.replace("-", " "), cfg)
    return list(grid.values())


def model_id(settings: BenchSettings) -> str:
    """Stable model name for cache keys: the reference label, an absolute folder, or a hub id."""
    if settings.model is None:
        return REFERENCE_ID
    path = Path(settings.model).expanduser()
    base = str(path.resolve()) if path.exists() else settings.model
    return f"{base}/{settings.gguf_file}" if settings.gguf_file else base


def eval_sources(settings: BenchSettings) -> dict[str, str]:
    """Evaluation set name (a file's stem, or the source) -> source; ``text`` first."""
    out: dict[str, str] = {}
    for src in dict.fromkeys((settings.text, *settings.evals)):
        name = Path(src).stem if src.endswith(TEXT_FILE_SUFFIXES) else src
        out[src if name in out else name] = src
    return out


def text_digest(source: str) -> str:
    """Content hash of a text source, so that a key follows the text rather than its path."""
    if source in HUB_TEXT_SOURCES:
        return source  # a pinned dataset; hashing it would mean downloading it to list the grid
    return hashlib.sha256(data.load_text(source).encode()).hexdigest()[:16]


def cache_entries(
    settings: BenchSettings, grid: Sequence[BenchSpec], out: str | os.PathLike
) -> list[Entry]:
    """Bind each run to its key and cache file (reads the texts to hash them; no model).

    The key hashes the model, dtype, evaluation windows, the config, and, for methods that read
    calibration data (not FP or RTN), the calibration text and windows. Which sets are evaluated
    is not in the key (see :func:`missing_sets`).
    """
    digests = {src: text_digest(src) for src in dict.fromkeys((settings.text, *settings.evals))}
    sets = {name: digests[src] for name, src in eval_sources(settings).items()}
    common = {
        "bench_version": BENCH_VERSION,
        "model": model_id(settings),
        "dtype": settings.dtype,
        # the windows stay in the key: with calib_start None they also place the calibration
        "eval": {"seqlen": settings.eval_seqlen, "windows": settings.eval_windows},
    }
    # calib_start None resolves from the text and the eval windows, both in the key already
    calib = {k: getattr(settings, k) for k in ("nsamples", "seqlen", "seed", "calib_start")}
    calib["text"] = digests[settings.text]
    entries = []
    for spec in grid:
        key_src = dict(common)
        if spec.cfg is not None:
            quant = asdict(spec.cfg)
            for name, default in KEY_OPTIONAL.items():  # keys from before the field stay valid
                if quant[name] == default or (
                    name in MODEL_ONLY and spec.cfg.allocation != "model"
                ):
                    del quant[name]
            key_src["quant"] = quant
            if spec.cfg.method != "rtn":
                key_src["calib"] = calib
        blob = json.dumps(key_src, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        path = Path(out) / f"{spec.name}-{key}.json"
        entries.append(Entry(spec, key, key_src, path, sets))
    return entries


def select(entries: list[Entry], only: Sequence[str] | None) -> list[Entry]:
    """The entries whose name matches one of the fnmatch patterns ``only`` (all if None)."""
    if not only:
        return list(entries)
    for pattern in only:
        if not any(fnmatch.fnmatchcase(e.spec.name, pattern) for e in entries):
            raise ValueError(f"--only {pattern}: matches no run of the grid; see --list")
    return [e for e in entries if any(fnmatch.fnmatchcase(e.spec.name, p) for p in only)]


def load_result(entry: Entry) -> dict[str, Any] | None:
    """The cached result of a run, or None when missing (or unreadable: it is then re-run)."""
    try:
        with open(entry.path) as f:
            result = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable cache file %s (%s)", entry.path, err)
        return None
    return result if result.get("key") == entry.key else None


def missing_sets(entry: Entry, result: dict[str, Any] | None) -> list[str]:
    """The evaluation sets of ``entry`` that ``result`` lacks (or holds for another text)."""
    have = {} if result is None else result.get("eval_digests", {})
    # a quantized run also needs its KL divergence against the float model on every set
    kl = {} if result is None or entry.spec.cfg is None else result.get("kl", {})
    need_kl = entry.spec.cfg is not None
    return [
        name
        for name, digest in entry.evals.items()
        if have.get(name) != digest or (need_kl and name not in kl)
    ]
