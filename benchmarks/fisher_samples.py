"""How many calibration windows the Fisher estimator needs: ``beta`` from fewer windows against a
measurement's, and what the difference costs the plan.

    python benchmarks/fisher_samples.py MEASUREMENT.safetensors [--samples 4 8 16] [--bits 3]

``MEASUREMENT`` is a ``baq measure`` (or bench) file of the reference model on the protocol's
calibration windows (its windows' hash is checked). The Fisher estimator
(``importance.fisher_importance``) runs on consecutive chunks of the first windows, so the
estimates from the first ``n`` are means of chunks and cost ``max(samples)`` windows in all.
For each ``n`` it prints: the seconds per window; the Spearman rank correlation of ``beta_l``
with the measurement's over the layers; the median and largest ``|1/2 log2(beta_n / beta)|``,
the shift in bits that an error of ``beta_l`` moves layer ``l`` by before rounding; and the
plan's cost: the plan made from ``beta_n``, priced by the measurement's ``beta``, over the
measurement's own plan (1.000 is no loss; the closed form is the minimum, so it is >= 1).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

from protocol import reference_and_calibration, samples_args

from baq.bench.plots import rank_correlation
from baq.config import QuantConfig
from baq.model import loader
from baq.run import importance
from baq.run.allocation import plan_levels
from baq.run.measure import Measurement


def main() -> None:
    args = samples_args(__doc__, [4, 8, 16])
    meas = Measurement.load(args.measurement)
    ref = meas.betas("fisher")
    model, calib = reference_and_calibration(meas)
    device = loader.resolve_device("auto")
    model.to(device)
    mods = dict(model.named_modules())
    targets = {n: mods[n] for n in meas.names}
    cuts = sorted(set(args.samples))
    sums = {n: 0.0 for n in meas.names}
    start, seconds = 0, 0.0
    cfg = QuantConfig(bits=args.bits, method="baq", allocation="model", sensitivity="analytic")
    best = plan_levels(meas, cfg)
    best_loss = sum(r * p.modelled_loss for r, p in zip(ref.tolist(), best))
    print(f"{len(meas.names)} layers; reference beta from the measurement's own windows")
    print("windows  s/window  spearman  median |dbits|  max |dbits|  plan loss / optimum")
    for cut in cuts:
        t = time.perf_counter()
        chunk = importance.fisher_importance(model, calib[start:cut], targets, device)
        seconds += time.perf_counter() - t
        for n, b in chunk.items():
            sums[n] += b * (cut - start)  # every window has the same number of tokens
        start = cut
        beta = [sums[n] / cut for n in meas.names]
        shift = [abs(0.5 * math.log2(b / r)) for b, r in zip(beta, ref.tolist())]
        trial = replace(meas, beta={"fisher": dict(zip(meas.names, beta))})
        plan = plan_levels(trial, cfg)
        loss = sum(r * p.modelled_loss for r, p in zip(ref.tolist(), plan))
        print(
            f"{cut:7d}  {seconds / cut:8.2f}  {rank_correlation(beta, ref.tolist()):8.4f}  "
            f"{statistics.median(shift):14.3f}  {max(shift):11.3f}  {loss / best_loss:19.4f}"
        )


if __name__ == "__main__":
    main()
