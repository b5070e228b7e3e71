"""The checkpoint of a ``baq tune`` run: ``OUTPUT.partial/tune-state.safetensors``.

One safetensors file, written atomically (:mod:`baq.atomic`), so a checkpoint is whole or
absent: the trainable parameters (``param/<name>``), Adam's moments and step count
(``adam/<name>/<key>``), and in its metadata the steps done, every step's loss and the run's
fingerprint (source folder, windows, teacher, settings). Restoring all of it, with the window
order a function of the step (:func:`baq.run.tune.batch_windows`), makes a resumed run end with
the bytes of an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from baq.atomic import write_safetensors
from baq.errors import one_line

STATE_FILE = "tune-state.safetensors"
STATE_FORMAT = "baq-tune-state/1"


@dataclass
class TuneState:
    """A tuning run after ``step`` steps."""

    fingerprint: dict
    step: int
    losses: list[float]
    tensors: dict[str, Tensor]

    @classmethod
    def of(
        cls,
        fingerprint: dict,
        step: int,
        losses: list[float],
        params: dict[str, nn.Parameter],
        opt: torch.optim.Optimizer,
    ) -> TuneState:
        state = opt.state_dict()["state"]
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
        for i, name in enumerate(params):
            for key, value in state.get(i, {}).items():
                tensors[f"adam/{name}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return cls(fingerprint, step, list(losses), tensors)

    def apply(self, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> tuple:
        """Put the saved parameters and optimizer state back.

        Returns:
            ``(steps done, losses so far)``.
        """
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.tensors[f"param/{name}"])
        state: dict[int, dict[str, Tensor]] = {}
        for i, name in enumerate(params):
            prefix = f"adam/{name}/"
            kept = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
            if kept:
                state[i] = kept
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        return self.step, list(self.losses)


def save_state(folder: Path, state: TuneState) -> None:
    meta = {
        "format": STATE_FORMAT,
        "fingerprint": json.dumps(state.fingerprint, sort_keys=True),
        "step": str(state.step),
        "losses": json.dumps(state.losses),
    }
    write_safetensors(folder / STATE_FILE, state.tensors, meta)


def load_state(folder: Path, fingerprint: dict) -> TuneState:
    """The checkpoint in ``folder``, checked against this run's fingerprint.

    Raises:
        ValueError: no checkpoint, a damaged one, or one of another run (one line, the fix).
    """
    from safetensors import safe_open

    path = folder / STATE_FILE
    if not path.is_file():
        raise ValueError(f"--resume: no tuning checkpoint at {path}; run without --resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError("not a baq tuning checkpoint")
        saved, step, losses = json.loads(meta["fingerprint"]), int(meta["step"]), meta["losses"]
        losses = [float(x) for x in json.loads(losses)]
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise ValueError(
            f"{path}: damaged tuning checkpoint ({one_line(err)}); delete {folder} and run "
            "again without --resume"
        ) from None
    wanted = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != wanted:
        what = ", ".join(
            k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)
        )
        raise ValueError(
            f"{path} belongs to another run ({what} differ): rerun with the same settings, "
            f"or delete {folder} and run without --resume"
        )
    return TuneState(saved, step, losses, tensors)
