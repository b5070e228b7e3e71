"""The standard protocol of DESIGN.md section 2: ``baq bench`` with its defaults, from anywhere.

    python benchmarks/protocol.py [--ptb] [any `baq bench` option, e.g. --only 'gptq-*' --list]

Reference model, WikiText-2 test (calibration from token 150000 on, evaluation on tokens
0..65535), fp32, the full method x bits grid, results in ``bench-out/`` at the repository root.
The shared texts are found relative to the repository (``../shared/data``), not the current
folder; ``--ptb`` adds the Penn Treebank test set as a second evaluation set. Runs already in
the cache are not repeated, so the script can be interrupted and started again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from baq.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def protocol_argv(argv: list[str]) -> list[str]:
    """``baq bench`` arguments: the protocol's text and output folder unless ``argv`` sets them."""
    args = ["bench"]
    if "--ptb" in argv:
        argv = [a for a in argv if a != "--ptb"]
        args += ["--eval", str(DATA / "ptb-test.txt")]
    if "--text" not in argv:
        args += ["--text", str(DATA / "wikitext2-test.txt")]
    if "--out" not in argv:
        args += ["--out", str(ROOT / "bench-out")]
    return args + argv


def samples_args(doc: str, default_samples: list[int]) -> argparse.Namespace:
    """The command line of the window-count studies: a measurement, ``--samples``, ``--bits``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("measurement", type=Path)
    p.add_argument("--samples", type=int, nargs="+", default=default_samples)
    p.add_argument("--bits", type=float, default=3.0)
    return p.parse_args()


def reference_and_calibration(meas: Any) -> tuple[Any, Any]:
    """The float32 reference model and the protocol's calibration windows, refused (exit) when
    ``meas`` (a ``baq.run.measure.Measurement``) was measured on other windows."""
    from baq.bench import grid, runner
    from baq.eval.divergence import windows_digest
    from baq.model import loader

    model, tok = loader.load_model(None, dtype="float32")
    calib, _, _ = runner.prepare_data(grid.BenchSettings(text=grid.default_text()), tok)
    if windows_digest(calib) != meas.settings["calib"]:
        raise SystemExit("the measurement was made on other calibration windows")
    return model, calib


if __name__ == "__main__":
    sys.exit(main(protocol_argv(sys.argv[1:])))
