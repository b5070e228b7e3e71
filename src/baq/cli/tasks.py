"""``baq eval --tasks``: downstream tasks through lm-evaluation-harness (see
:mod:`baq.integrations.lm_eval_harness`).

The options are checked, the tasks found and their datasets loaded before the model is, so a
missing lm-eval, an unknown task name or a missing data file ends the run in one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import one_line
from .checks import UsageError, is_saved_folder, positive


def add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('downstream tasks (lm-evaluation-harness, pip install "baq[eval]")')
    g.add_argument(
        "--tasks",
        action="append",
        default=None,
        metavar="NAMES",
        help="lm-eval task, group or tag names, comma-separated, repeatable (alone: tasks only, "
        "no perplexity unless --eval is given)",
    )
    g.add_argument(
        "--tasks-dir",
        type=Path,
        metavar="DIR",
        help="a folder of lm-eval task YAML files, searched before lm-eval's own (local data: "
        "dataset_path: json with dataset_kwargs: {data_files: ...})",
    )
    g.add_argument("--tasks-limit", type=int, metavar="N", help="the first N items of each task")
    g.add_argument(
        "--num-fewshot", type=int, metavar="K", help="examples per prompt (default: the task's)"
    )


def check_tasks(args: argparse.Namespace) -> Any:
    """Validate the task options and load the tasks (no model yet).

    Returns:
        :class:`baq.integrations.lm_eval_harness.PreparedTasks`, or None without ``--tasks``.
    """
    if args.tasks is None:
        if args.tasks_dir is not None:
            raise UsageError("--tasks-dir: name the tasks to run with --tasks NAMES")
        return None
    from baq.integrations import lm_eval_harness

    names = lm_eval_harness.split_names(args.tasks)
    if not names:
        raise UsageError("--tasks: no task names given; e.g. --tasks arc_easy,hellaswag")
    positive("tasks-limit", args.tasks_limit)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot={args.num_fewshot}: use 0 or more")
    if args.tasks_dir is not None and not args.tasks_dir.is_dir():
        raise UsageError(f"--tasks-dir {args.tasks_dir}: not a folder; give the folder of YAMLs")
    if is_saved_folder(args.model):
        from baq.model.loader import has_tokenizer_files

        if not has_tokenizer_files(Path(args.model)):
            raise UsageError(
                f"{args.model}: has no tokenizer files; lm-eval tasks need one (save it into the "
                "folder with tokenizer.save_pretrained)"
            )
    try:
        lm_eval_harness.require_lm_eval()
    except ImportError as err:
        raise UsageError(f"--tasks: {err}") from None
    if args.eval is None:  # --tasks alone: the tasks, not also the default perplexity text
        args.eval_default = []
    try:
        return lm_eval_harness.prepare(names, args.tasks_dir)
    except ValueError as err:
        raise UsageError(f"--tasks: {one_line(err)}") from None
    except Exception as err:  # datasets/jinja/yaml errors of a task's files, many types
        raise UsageError(
            f"--tasks {','.join(names)}: cannot load it ({type(err).__name__}: {one_line(err)}); "
            "check its YAML and data files"
        ) from None


def eval_tasks(args: argparse.Namespace, prepared: Any, model: Any, tok: Any) -> dict[str, Any]:
    """Run the prepared tasks on the loaded model, print one line per metric, and return the
    report's ``tasks`` section."""
    from baq.integrations import lm_eval_harness

    results = lm_eval_harness.evaluate(
        model, tok, prepared, limit=args.tasks_limit, num_fewshot=args.num_fewshot
    )
    section = lm_eval_harness.summarize(results)
    print(lm_eval_harness.format_tasks(section))
    return section
