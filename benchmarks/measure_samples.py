"""How many calibration windows the measurement's Hessians need: the sensitivities ``c_lj`` from
the first ``n`` windows against a measurement's (all windows), and what the difference costs the
plan at one budget.

    python benchmarks/measure_samples.py MEASUREMENT.safetensors [--samples 16 32 64] [--bits 3]

``MEASUREMENT`` is a ``baq measure`` (or bench) file of the reference model on the protocol's
calibration windows (their hash is checked) whose Hessians read every window. For each ``n`` the
sensitivity pass (:func:`baq.run.measure.measure_model` without estimators) runs on the first ``n``
windows and this prints: its seconds, and their ratio to the full pass's recorded seconds
(``n / nsamples`` if the pass is linear in windows); the Spearman rank correlation of ``log c``
over every column of the model; the median and largest ``|1/2 log2(c_n / c)|``, the shift in
bits an error of ``c_lj`` moves column ``j`` by before rounding; and the plan's cost: the plan
made from ``c_n`` (same ``beta``), priced by the measurement's ``c``, over the measurement's own
plan (1.000 is no loss; the closed form is the minimum of the modelled loss, so it is >= 1).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import torch
from protocol import reference_and_calibration, samples_args

from baq.bench.plots import rank_correlation
from baq.config import QuantConfig
from baq.quant import allocate
from baq.run.allocation import plan_levels
from baq.run.measure import MEASURED_FIELDS, Measurement, measure_model


def priced(plans, meas: Measurement, beta: torch.Tensor) -> float:
    """``sum_l beta_l sum_j c_lj / L_lj^2`` of ``plans`` on ``meas``'s sensitivities."""
    return sum(
        float(b) * allocate.modelled_loss(meas.sens[p.name], p.levels) for p, b in zip(plans, beta)
    )


def config_of(meas: Measurement, bits: float) -> QuantConfig:
    """The model-level BAQ settings ``meas`` was measured with, at ``bits``."""
    fields = {k: meas.settings[k] for k in MEASURED_FIELDS if k in meas.settings}
    fields["skip"] = tuple(fields.get("skip", ()))
    return QuantConfig(bits=bits, method="baq", allocation="model", **fields)


def main() -> None:
    args = samples_args(__doc__, [16, 32, 64])
    ref = Measurement.load(args.measurement)
    estimator = next(iter(ref.beta))
    model, calib = reference_and_calibration(ref)
    cfg = config_of(ref, args.bits)
    beta = ref.betas(estimator)
    best = priced(plan_levels(ref, cfg), ref, beta)
    full_s = ref.seconds.get("sensitivity", float("nan"))
    ref_log = torch.cat([ref.sens[n].clamp(min=1e-300).log() for n in ref.names])
    print(
        f"{len(ref.names)} layers, {len(ref_log)} columns; reference c from {len(calib)} windows"
        f" ({full_s:.0f} s), beta {estimator}, plan at {args.bits:g} bits"
    )
    print("windows  seconds  s/full  spearman  median |dbits|  max |dbits|  plan loss / optimum")
    for n in sorted(set(args.samples)):
        trial = measure_model(model, calib[:n], cfg, estimators=(), progress=False)
        log_c = torch.cat([trial.sens[k].clamp(min=1e-300).log() for k in ref.names])
        shift = ((log_c - ref_log).abs() / (2 * math.log(2))).tolist()
        trial = replace(trial, beta=ref.beta)
        loss = priced(plan_levels(trial, cfg), ref, beta)
        s = trial.seconds["sensitivity"]
        print(
            f"{n:7d}  {s:7.0f}  {s / full_s:6.3f}  "
            f"{rank_correlation(log_c.tolist(), ref_log.tolist()):8.4f}  "
            f"{statistics.median(shift):14.3f}  {max(shift):11.3f}  {loss / best:19.4f}"
        )


if __name__ == "__main__":
    main()
