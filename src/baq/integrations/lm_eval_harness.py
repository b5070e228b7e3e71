"""Downstream tasks through lm-evaluation-harness (EleutherAI), an optional dependency.

``lm_eval`` is imported only here and only when tasks are asked for, so the core needs none of
it (``pip install "baq[eval]"``). The model is handed to lm-eval already loaded
(``HFLM(pretrained=model, tokenizer=...)``), so a saved baq folder is evaluated with its packed
linears exactly as ``baq eval`` computes its perplexity.

Tasks are found by name among lm-eval's own and the YAML files of a local folder
(``tasks_dir``). A local task reads its items from local files
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``), so it runs offline;
a multiple-choice item is scored as lm-eval scores it: the choice with the largest
log-likelihood of its text after the prompt is the prediction (Gao et al., *A framework for
few-shot language model evaluation*, 2021-2024).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INSTALL = 'pip install "baq[eval]"'


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or an ImportError whose one line says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(
            f"downstream tasks need lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    return lm_eval


def split_names(specs: list[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (lm-eval's comma lists, repeatable), in order,
    each once."""
    names: list[str] = []
    for spec in specs:
        for name in spec.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


@dataclass
class PreparedTasks:
    """Tasks found and their datasets loaded, before any model is: what :func:`evaluate` runs.

    ``objects`` are lm-eval's top-level Task/Group objects (a group carries its subtasks),
    ``manager`` the ``TaskManager`` that found them.
    """

    names: list[str]
    manager: Any
    objects: list[Any]


def _manager(tasks_dir: Path | None, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(tasks_dir) if tasks_dir is not None else None, include_defaults=defaults
    )


def find_tasks(names: list[str], tasks_dir: Path | None = None) -> Any:
    """A ``TaskManager`` that knows every name (task, group or tag), or a one-line ValueError.

    The local folder is indexed alone first: lm-eval's own index (thousands of YAML files, some
    seconds) is read only when a name is not in it.
    """
    require_lm_eval()
    manager = _manager(tasks_dir, defaults=False) if tasks_dir is not None else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = _manager(tasks_dir, defaults=True)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f"{tasks_dir} or lm-eval's tasks" if tasks_dir is not None else "lm-eval's tasks"
        raise ValueError(
            f"task {missing[0]!r} is not in {where}: check the name (lm-eval ls tasks lists "
            "lm-eval's), or the task: field of its YAML in --tasks-dir"
        )
    return manager


def prepare(names: list[str], tasks_dir: Path | None = None) -> PreparedTasks:
    """Find the named tasks and load their datasets: a missing data file fails here, before a
    model is loaded.

    Args:
        names: task, group or tag names (see :func:`split_names`).
        tasks_dir: a folder of task YAML files, searched before lm-eval's own tasks.
    """
    manager = find_tasks(names, tasks_dir)
    loaded = manager.load(names)
    # Top level: what no loaded group contains (a group evaluates its children itself).
    children = {c for kids in loaded["group_map"].values() for c in kids}
    objects = [
        obj
        for kind in ("groups", "tasks")
        for name, obj in loaded[kind].items()
        if name not in children
    ]
    return PreparedTasks(names, manager, objects)


def _passed_model_notes(record: logging.LogRecord) -> bool:
    """Drop the two warnings lm-eval gives whenever a model object, not a name, is passed:
    that is how baq always calls it."""
    msg = record.getMessage()
    return not ("`pretrained` model kwarg is not of type" in msg or "already-initialized" in msg)


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: PreparedTasks,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on an already loaded model.

    Args:
        model: a transformers causal LM (a saved baq folder loaded by ``storage.load_quantized``
            included), already on its device.
        tokenizer: its tokenizer.
        tasks: from :func:`prepare`.
        limit: the first ``limit`` items of each task (None: all).
        num_fewshot: examples in each prompt (None: each task's own setting).
        batch_size: requests per forward; 1 scores every request alone (no padding).
    Returns:
        lm-eval's result dict, per-item samples included (``log_samples=True``).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    hf_log = logging.getLogger("lm_eval.models.huggingface")
    hf_log.addFilter(_passed_model_notes)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.removeFilter(_passed_model_notes)
    log.info("lm-eval %s on %s", lm_eval.__version__, ", ".join(tasks.names))
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks.objects,
        task_manager=tasks.manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=True,
    )


def run_tasks(
    model: Any, tokenizer: Any, names: list[str], tasks_dir: Path | None = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`prepare` then :func:`evaluate`, and the report section of :func:`summarize`."""
    return summarize(evaluate(model, tokenizer, prepare(names, tasks_dir), **kwargs))


def _metrics(row: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A"}`` -> ``{"acc": 0.5, "acc_stderr": None}``:
    lm-eval's ``metric,filter`` keys, the default filter's name dropped."""
    out: dict[str, float | None] = {}
    for key, value in row.items():
        if "," not in key:  # name, alias, sample_len
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else key
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def predictions(samples: list[dict[str, Any]]) -> list[int]:
    """Per-item choice with the largest log-likelihood (what ``acc`` scores), in document order.

    Args:
        samples: lm-eval's samples of one multiple-choice task; each item's ``filtered_resps``
            holds one ``(loglikelihood, is_greedy)`` pair per choice.
    """
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [
        max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
        for s in ordered
    ]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The ``tasks`` section of a report: per task its metrics, item count, shots, and for a
    multiple-choice task the per-item predictions (so two models compare item by item).

    Returns:
        ``{name: {"metrics": {...}, "items": n, "num_fewshot": k, "output_type": ...,
        "predictions": [...]}}`` plus ``"lm_eval_version"``.
    """
    samples = results.get("samples") or {}
    out: dict[str, Any] = {}
    for name, row in results["results"].items():
        config = results.get("configs", {}).get(name, {})
        entry: dict[str, Any] = {"metrics": _metrics(row)}
        n = results.get("n-samples", {}).get(name)
        if n is not None:
            entry["items"] = n["effective"]
        if name in results.get("n-shot", {}):
            entry["num_fewshot"] = results["n-shot"][name]
        if "output_type" in config:
            entry["output_type"] = config["output_type"]
        if config.get("output_type") == "multiple_choice" and name in samples:
            entry["predictions"] = predictions(samples[name])
        out[name] = entry
    return {"lm_eval_version": results.get("lm_eval_version"), "results": out}


def format_tasks(section: dict[str, Any]) -> str:
    """One line per task and metric for the terminal: ``task acc: 0.4500 +- 0.1141 (20 items)``."""
    lines = []
    for name, entry in section["results"].items():
        metrics = entry["metrics"]
        items = f" ({entry['items']} items)" if "items" in entry else ""
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr," in metric or value is None:
                continue
            stderr = metrics.get(
                metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr"
            )
            pm = f" +- {stderr:.4f}" if stderr is not None else ""
            lines.append(f"task {name} {metric}: {value:.4f}{pm}{items}")
    return "\n".join(lines)
