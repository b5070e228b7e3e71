"""benchmarks/frontier.py: the frontier and the run-name parsing its plot styles rely on."""

import random
import sys
from pathlib import Path

import pytest

from baq.bench import grid as bench_grid

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
frontier = pytest.importorskip("frontier")


@pytest.mark.parametrize("seed", range(5))
def test_frontier_is_the_runs_no_other_beats_at_equal_or_fewer_bits(seed):
    rng = random.Random(seed)
    pts = [(rng.choice([2.0, 2.5, 3.0, 3.1]), rng.uniform(10, 100), f"r{i}") for i in range(30)]
    front = frontier.frontier(pts)
    slow = [p for p in pts if not any(q is not p and q[0] <= p[0] and q[1] <= p[1] for q in pts)]
    assert sorted(front) == sorted(slow)


def test_variant_reads_back_what_build_grid_names():
    grid = bench_grid.build_grid(
        ["gptq", "baq-model", "baq-measured"],
        [3],
        [2.5],
        group_size=128,
        act_order=True,
        dims=("oc", "ic", "auto"),
        clip=True,
    )
    assert len(grid) > 30
    for spec in grid:
        family, dim, grouped, act = frontier.variant(spec.name)
        assert (family, dim, grouped, act) == (
            spec.family,
            spec.cfg.dim,
            spec.cfg.group_size is not None,
            spec.cfg.act_order,
        ), spec.name
    assert frontier.variant("baq-model-4b-s6") == ("baq-model", "oc", False, False)
