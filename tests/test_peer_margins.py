"""benchmarks/peer_margins.py: the margins of the lightly comparison against a hand computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_margins.py"
_SPEC = importlib.util.spec_from_file_location("peer_margins", _PATH)
peer_margins = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peer_margins)

# Two seeds a side, checkpoints every 100 steps; ours takes 3.0 s a step, lightly 3.2 s.
RUNS = {
    "ours": {0: [(100, 0.50), (200, 0.60), (300, 0.70), (400, 0.80)],
             1: [(400, 0.78), (100, 0.52), (200, 0.62), (300, 0.72)]},  # any order
    "lightly": {0: [(100, 0.50), (200, 0.58), (300, 0.66), (400, 0.74)],
                1: [(100, 0.48), (200, 0.60), (300, 0.68), (400, 0.76)]},
}
SECONDS = {"ours": 3.0, "lightly": 3.2}


def test_margins_against_a_hand_computation():
    result = peer_margins.margins(RUNS, SECONDS)
    assert result["seeds"] == [0, 1]
    # Equal steps, at step 400: 0.80 - 0.74 and 0.78 - 0.76, i.e. 6 and 2 points; mean 4.
    assert result["equal_steps_margin"] == pytest.approx(4.0)
    # Equal time: ours ends first, at 400 x 3.0 s = 20 min; lightly is at step 20 x 60 / 3.2 = 375
    # there, three quarters of the way from 300 to 400: 0.66 + 0.75 x 0.08 = 0.72 and 0.74.
    # Margins 0.80 - 0.72 = 8 and 0.78 - 0.74 = 4 points; mean 6.
    seed0 = result["per_seed"][0]
    assert seed0["equal_time_minutes"] == pytest.approx(20.0)
    assert seed0["lightly_at_equal_time"] == pytest.approx(0.72) and seed0["ours_at_equal_time"] == pytest.approx(0.80)
    assert result["per_seed"][1]["equal_time_margin"] == pytest.approx(4.0)
    assert result["equal_time_margin"] == pytest.approx(6.0)
    # Standard error: each side's two values differ by 0.02, so each sample variance is 0.0002 and
    # the error sqrt(0.0002 / 2 + 0.0002 / 2) = 0.01414, i.e. 1.414 points, at both readings.
    assert result["equal_time_margin_se"] == pytest.approx(1.41421, abs=1e-4)
    assert result["equal_steps_margin_se"] == pytest.approx(1.41421, abs=1e-4)


def test_interpolation_reads_between_checkpoints_and_never_beyond():
    points = [(10, 0.2), (30, 0.6), (20, 0.5)]
    assert peer_margins.interpolate(points, 15) == pytest.approx(0.35)
    assert peer_margins.interpolate(points, 25) == pytest.approx(0.55)
    assert peer_margins.interpolate(points, 30) == pytest.approx(0.6)
    for outside in (5, 31):
        with pytest.raises(ValueError, match="no extrapolation"):
            peer_margins.interpolate(points, outside)
    assert peer_margins.standard_error_of_difference([0.5], [0.4, 0.6]) is None  # one seed: no error bar
