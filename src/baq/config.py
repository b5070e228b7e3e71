"""Run settings as small frozen dataclasses, validated once on creation.

Every field error raises ``ValueError`` with one line that names the field, the bad value and the
fix; the CLI turns it into exit code 2 before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Method = Literal["rtn", "gptq", "baq"]
Sensitivity = Literal["measured", "analytic"]

METHODS: tuple[str, ...] = ("rtn", "gptq", "baq")
SENSITIVITIES: tuple[str, ...] = ("measured", "analytic")
# BAQ's allocation scope: each layer its own budget (the paper), or one budget for the model
ALLOCATIONS: tuple[str, ...] = ("layer", "model")
# estimators of a layer's importance beta_l for the model-level allocation (importance.py)
# the largest --group-size: an int32, which every tensor op and file field holds
MAX_GROUP_SIZE = 2**31 - 1
IMPORTANCES: tuple[str, ...] = ("fisher", "noise")
RANGE_DTYPES: tuple[str, ...] = ("float16", "float32")  # grid ranges (quant/grid.py)
# grid dimension (quant/grid.py): per output channel (a row's range), per input channel (a
# column's), or AdaDim's choice per layer (quant/adadim.py)
GRID_DIMS: tuple[str, ...] = ("oc", "ic", "auto")
# AdaDim's criterion with dim="auto": the layer's proxy error on its Hessian (quant/adadim.py), or
# the paper's block output error of an RTN pass on calibration windows (baq/adadim_block.py)
ADADIM_CRITERIA: tuple[str, ...] = ("proxy", "block")
# Text sources (data.py); the hub ones are downloaded with ``datasets``, calibrate on their
# train split and evaluate on their test split.
HUB_TEXT_SOURCES: tuple[str, ...] = ("wikitext2", "ptb", "c4")
TEXT_SOURCES: tuple[str, ...] = ("builtin", *HUB_TEXT_SOURCES)
TEXT_FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")
# What a loaded quantized linear keeps between forwards (packed_linear.py): nothing (packed codes
# only, dequantized in every forward), the integer codes minus zero points (one byte per weight),
# the dequantized weight (the float model's memory and speed), or a layout of the codes that a
# fused CPU kernel (baq/kernels) multiplies by in place of the packed codes: "kernel", 16 rows in
# the lanes and the level counts as mixed-radix segments (row_lanes.py: 1.08 times the stored
# bytes on the rotated 3-bit reference model, and its fastest mode there); "lanes", 16 columns in
# the lanes as bit fields (lanes.py: 1.21 times, up to 1.3x faster at one token on
# 14336-column layers); "compact", that layout with counts such as 3, 5, 6 and 9 to 11 as radix
# digits (docs/RESULTS.md).
WEIGHT_CACHES: tuple[str, ...] = ("none", "codes", "weight", "kernel", "lanes", "compact")
# the caches that run the native (or numba) kernel on the CPU, each on its own layout
KERNEL_CACHES: tuple[str, ...] = ("kernel", "lanes", "compact")
# the cache of baq.load, baq generate/eval, from_pretrained and pipeline: the kernel layout, faster
# than "codes" end to end on the reference model at a third of its memory (issue 26,
# docs/results/kernel-s13.md); a GPU input runs a kernel layer as "codes"
DEFAULT_CACHE = "kernel"
# top tokens per position that the compact base record of an evaluation keeps (eval/divergence.py):
# 97 % of the KL at 4-bit RTN (docs/RESULTS.md); here, not there, so that the memory estimate,
# which must not import torch, reads the same number
DEFAULT_TOPK = 1024
# optimizer steps of ``baq tune``: 100 steps gave 85 % of 200 steps' gain at 3 bits on the reference
# model (KL 0.280 untuned, 0.240 at 100, 0.233 at 200; docs/RESULTS.md session 17) in half the time,
# which brings the stage near the quantization pass's time
DEFAULT_TUNE_STEPS = 100
# tokens of a tuning window: 100 steps of 256 tokens keep 90 % of the gain of 100 steps of 512
# (WikiText-2 26.62 against 26.43, untuned 28.34, 3 bits rotated) in half the time, which puts the
# whole ``baq tune`` at 0.64x the whole ``baq quantize`` (docs/RESULTS.md session 18)
DEFAULT_TUNE_SEQLEN = 256
# calibration tokens of one batched block forward (run/walker.py), read by the memory estimate too
BATCH_TOKENS = 4096


def base_record_bytes(positions: int, k: int = DEFAULT_TOPK) -> int:
    """Bytes of a compact base record (eval/divergence.BaseWindow) over ``positions`` positions:
    per position ``k`` float32 log-probs and ``k`` int32 token ids, and the next token's float32
    log-prob."""
    return positions * (k * (4 + 4) + 4)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize each linear layer.

    ``bits`` is the target average bits per weight. RTN and GPTQ use it for every column, so it
    must be an integer; BAQ distributes it over the columns (DESIGN.md section 1) and accepts any
    value up to ``log2(max_levels)``, e.g. 2.5.
    """

    method: Method = "baq"
    bits: float = 3.0
    group_size: int | None = None  # None: one range per row (per column with dim="ic")
    sym: bool = False
    act_order: bool = False
    percdamp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # GPTQ lazy-batch block
    integer_bits: bool = False  # BAQ: levels restricted to powers of two
    # BAQ: where c_j comes from; None: analytic with the model allocation (its measurement pass
    # reads the float model's Hessians), measured (a uniform solve) per layer
    sensitivity: Sensitivity | None = None
    exponent: float = 2.0  # BAQ: t in b_j = B + (1/t) log2(c_j / geomean c); published code 1.95
    max_levels: int = 256  # BAQ: cap on the level count of one column
    # BAQ: floor on the level count of one column; None: 2 with rotate (a rotated layer's
    # columns are alike, and the loss model, blind to GPTQ's feedback through a run of pruned
    # columns, would prune whole layers: DESIGN.md section 1), else 1 (a column may be pruned)
    min_levels: int | None = None
    hessian_dtype: Literal["float32", "float64"] = "float32"
    range_dtype: Literal["float16", "float32"] = "float16"  # grid ranges (quant/grid.py)
    dim: Literal["oc", "ic", "auto"] = "oc"  # grid ranges per row, per column, or AdaDim's pick
    adadim: Literal["proxy", "block"] = "proxy"  # how dim="auto" picks (ADADIM_CRITERIA)
    skip: tuple[str, ...] = ()  # fnmatch patterns of linear names left in full precision
    # BAQ: one budget for the model (the default: it wins at every budget measured) or per
    # layer (the paper's); None: model for BAQ, layer for RTN and GPTQ
    allocation: Literal["layer", "model"] | None = None
    importance: Literal["fisher", "noise"] = "fisher"  # model allocation: beta_l estimator
    # calibration windows the beta_l estimator reads: on the reference model 8 windows' Fisher
    # betas plan within 0.03 % of the modelled loss of 32 windows' (benchmarks/fisher_samples.py)
    importance_samples: int = 8
    # calibration windows the measurement pass's Hessians (the sensitivities c_lj) read; None:
    # all. On the reference model the first 32 of 128 windows give a 3-bit plan within 0.3 % of
    # all windows' modelled loss (Spearman of log c 0.998; benchmarks/measure_samples.py), at a
    # quarter of the pass's forwards
    measure_samples: int | None = 32
    # the output head as one more layer after the last block (its tied embedding reads it too)
    include_head: bool = False
    # per-OC ranges shrunk where that rounds the row better (quant/clip.py); None: wherever the
    # grid has per-OC ranges (dim oc or auto), the default: on the reference model it wins at 2,
    # 3 and 4 bits (BAQ) and 3 (GPTQ), on Gemma 3 270M at 3 bits (docs/RESULTS.md, session 14)
    clip: bool | None = None
    # incoherence processing: each linear quantized in the basis of a seeded randomized Hadamard
    # transform of its inputs (quant/rotation.py); rotate_seed and the layer's name give its seed.
    # None: on for BAQ and GPTQ (it wins at 2 to 4 bits on the reference model and at 3 and 4 on
    # Gemma 3 270M, docs/RESULTS.md sessions 15-19), except with AdaDim's block criterion, which
    # rounds the unrotated weights; off for RTN, the plain baseline
    rotate: bool | None = None
    rotate_seed: int = 0

    @property
    def _block_adadim(self) -> bool:
        """AdaDim's block criterion: it rounds the unrotated weights, so it excludes rotation."""
        return self.dim == "auto" and self.adadim == "block"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {', '.join(METHODS)}")
        # the defaults that depend on other fields, resolved once so asdict() shows what ran
        if self.allocation is None:
            object.__setattr__(self, "allocation", "model" if self.method == "baq" else "layer")
        if self.sensitivity is None:
            default = "analytic" if self.allocation == "model" else "measured"
            object.__setattr__(self, "sensitivity", default)
        if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits)):
            raise ValueError(f"bits={self.bits!r}: use a number in [1, 8], e.g. --bits 3")
        if not 1.0 <= self.bits <= 8.0:
            raise ValueError(
                f"bits={self.bits}: use a value in [1, 8] (8 bits = 256 levels is the most), "
                "e.g. --bits 3"
            )
        # an int (QuantConfig(bits=3)) is recorded as the command line records it: 3.0
        object.__setattr__(self, "bits", float(self.bits))
        if self.method != "baq" and float(self.bits) != int(self.bits):
            raise ValueError(
                f"bits={self.bits}: {self.method} gives every weight the same integer bitwidth; "
                "use an integer, or --method baq for fractional budgets"
            )
        if not 2 <= self.max_levels <= 65536:
            raise ValueError(f"max_levels={self.max_levels}: use a value in [2, 65536], e.g. 256")
        if self.rotate is None:
            object.__setattr__(self, "rotate", self.method != "rtn" and not self._block_adadim)
        if self.min_levels is None:
            object.__setattr__(self, "min_levels", 2 if self.rotate is True else 1)
        if not (
            isinstance(self.min_levels, int)
            and not isinstance(self.min_levels, bool)
            and 1 <= self.min_levels <= self.max_levels
        ):
            raise ValueError(
                f"min_levels={self.min_levels!r}: use an integer in [1, max_levels="
                f"{self.max_levels}], e.g. 2 (no column pruned)"
            )
        if self.method == "baq" and self.bits < math.log2(self.min_levels) - 1e-12:
            raise ValueError(
                f"bits={self.bits} is below the floor of min_levels={self.min_levels} "
                f"(log2 = {math.log2(self.min_levels):g} bits per column): raise --bits or "
                "lower --min-levels"
            )
        if self.method == "baq" and self.bits > math.log2(self.max_levels):
            top = math.log2(self.max_levels)
            raise ValueError(
                f"bits={self.bits} cannot be reached with max_levels={self.max_levels} "
                f"(at most log2({self.max_levels}) = {top:g} bits per column): lower --bits to "
                f"{top:g} or raise --max-levels to {2 ** math.ceil(self.bits)}"
            )
        if self.group_size is not None and not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise ValueError(
                f"group_size={self.group_size}: use a positive integer up to {MAX_GROUP_SIZE}, "
                "e.g. 128 (a group as large as the layer is one range per row)"
            )
        if not 0.0 < self.percdamp < 1.0:
            raise ValueError(f"percdamp={self.percdamp}: use a value in (0, 1), e.g. 0.01")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: use a positive integer, e.g. 128")
        if self.integer_bits and self.method != "baq":
            raise ValueError("integer_bits applies to --method baq only")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(
                f"sensitivity={self.sensitivity!r}: use one of {', '.join(SENSITIVITIES)}"
            )
        if not self.exponent > 0:
            raise ValueError(f"exponent={self.exponent}: use a positive value, e.g. 2")
        if self.range_dtype not in RANGE_DTYPES:
            raise ValueError(
                f"range_dtype={self.range_dtype!r}: use one of {', '.join(RANGE_DTYPES)}"
            )
        if self.dim not in GRID_DIMS:
            raise ValueError(f"dim={self.dim!r}: use one of {', '.join(GRID_DIMS)}")
        if self.dim == "auto" and self.method == "rtn":
            raise ValueError(
                "dim='auto' compares the grids on the layer's Hessian, which RTN does not collect: "
                "use --dim oc or ic with rtn, or --method gptq/baq"
            )
        if self.adadim not in ADADIM_CRITERIA:
            raise ValueError(f"adadim={self.adadim!r}: use one of {', '.join(ADADIM_CRITERIA)}")
        if self.adadim != "proxy" and self.dim != "auto":
            raise ValueError(
                f"adadim={self.adadim!r} is how --dim auto chooses, and dim is {self.dim!r}: "
                "add --dim auto or drop --adadim"
            )
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"hessian_dtype={self.hessian_dtype!r}: use float32 or float64")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r}: use one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "model" and self.method != "baq":
            raise ValueError("allocation='model' applies to --method baq only")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance={self.importance!r}: use one of {', '.join(IMPORTANCES)}")
        if self.importance_samples < 1:
            raise ValueError(
                f"importance_samples={self.importance_samples}: use a positive integer, e.g. 8"
            )
        if self.measure_samples is not None and self.measure_samples < 1:
            raise ValueError(
                f"measure_samples={self.measure_samples}: use a positive integer, e.g. 32"
            )
        if self.clip is None:
            object.__setattr__(self, "clip", self.dim != "ic")
        if not isinstance(self.clip, bool):
            raise ValueError(f"clip={self.clip!r}: use True or False")
        if self.clip and self.dim == "ic":
            raise ValueError(
                "clip searches per-OC ranges, and per-IC ones are fitted inside the solve: "
                "use --dim oc or auto with --clip, or drop --clip"
            )
        if not isinstance(self.rotate, bool):
            raise ValueError(f"rotate={self.rotate!r}: use True or False")
        if not (
            isinstance(self.rotate_seed, int)
            and not isinstance(self.rotate_seed, bool)
            and 0 <= self.rotate_seed < 2**63
        ):
            raise ValueError(
                f"rotate_seed={self.rotate_seed!r}: use an integer in [0, 2^63), e.g. 0"
            )
        if self.rotate and self._block_adadim:
            raise ValueError(
                "adadim='block' rounds the unrotated weights, and --rotate quantizes rotated ones: "
                "use --adadim proxy with --rotate, or --no-rotate"
            )
        if not isinstance(self.include_head, bool):
            raise ValueError(f"include_head={self.include_head!r}: use True or False")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"skip={self.skip!r}: use a tuple of name patterns")
