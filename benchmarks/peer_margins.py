"""The arithmetic of benchmarks/peer_quality.py: accuracy against steps and wall-clock, and the
margins between ours and lightly, with their standard errors (no torch, so a unit test is fast).

A run is a list of checkpoints ``(step, linear_top1)``, top-1 as a fraction. Steps become
wall-clock minutes through one side's median seconds per step (measured in one alternating run,
so the accuracy runs may share a busy machine). Margins are in linear top-1 points (percent):

* ``equal_steps_margin``: per seed, ours minus lightly at the largest step both runs reached;
  the mean over seeds.
* ``equal_time_margin``: per seed, ours minus lightly at the largest wall-clock time both runs
  reach, each run's accuracy read there by linear interpolation between its checkpoints; the
  mean over seeds.

The standard errors treat the two sides' runs as independent samples (a seed number shared by
the two libraries shares no randomness): ``sqrt(s_ours^2 / n_ours + s_lightly^2 / n_lightly)``
with sample standard deviations over seeds (Welch's). One seed per side gives no error bar (None).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["interpolate", "margins", "standard_error_of_difference"]

Run = Sequence[tuple[float, float]]  # (step, linear top-1) per checkpoint


def interpolate(points: Run, x: float) -> float:
    """The value at ``x`` on the polyline through ``points`` (sorted by x here); ``x`` must lie
    within the first and last point's x: no extrapolation."""
    points = sorted(points)
    if not points or not points[0][0] <= x <= points[-1][0]:
        raise ValueError(f"{x} lies outside the checkpoints' range {[p[0] for p in points]}: no extrapolation.")
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]  # a single point, at x


def standard_error_of_difference(ours: Sequence[float], lightly: Sequence[float]) -> float | None:
    """Standard error of mean(ours) - mean(lightly) for independent samples; None below 2 each."""
    if len(ours) < 2 or len(lightly) < 2:
        return None
    return math.sqrt(statistics.variance(ours) / len(ours) + statistics.variance(lightly) / len(lightly))


def margins(runs: dict[str, dict[int, Run]], seconds_per_step: dict[str, float]) -> dict:
    """Both margins (mean over the seeds both sides ran), their standard errors, and per seed the
    step and minutes they were read at and each side's accuracy there.

    ``runs``: ``{"ours": {seed: [(step, top1), ...]}, "lightly": {...}}``; ``seconds_per_step``:
    the two sides' medians."""
    seeds = sorted(set(runs["ours"]) & set(runs["lightly"]))
    if not seeds:
        raise ValueError("No seed has runs of both sides.")
    per_seed, at_steps, at_time = {}, {"ours": [], "lightly": []}, {"ours": [], "lightly": []}
    for seed in seeds:
        ours, lightly = sorted(runs["ours"][seed]), sorted(runs["lightly"][seed])
        common_steps = {step for step, _ in ours} & {step for step, _ in lightly}
        if not common_steps:
            raise ValueError(f"Seed {seed}: the two sides share no checkpoint step.")
        step = max(common_steps)
        minutes = {side: [(s * seconds_per_step[side] / 60, top1) for s, top1 in run]
                   for side, run in (("ours", ours), ("lightly", lightly))}
        time = min(points[-1][0] for points in minutes.values())  # the largest time both reach
        record = {"equal_steps_step": step, "equal_time_minutes": time}
        for side, run in (("ours", ours), ("lightly", lightly)):
            at_steps[side].append(dict(run)[step])
            at_time[side].append(interpolate(minutes[side], time))
            record[f"{side}_at_equal_steps"] = at_steps[side][-1]
            record[f"{side}_at_equal_time"] = at_time[side][-1]
        record["equal_steps_margin"] = 100 * (record["ours_at_equal_steps"] - record["lightly_at_equal_steps"])
        record["equal_time_margin"] = 100 * (record["ours_at_equal_time"] - record["lightly_at_equal_time"])
        per_seed[seed] = record

    def points(values: dict[str, list[float]]) -> tuple[float, float | None]:
        margin = 100 * (statistics.fmean(values["ours"]) - statistics.fmean(values["lightly"]))
        error = standard_error_of_difference(values["ours"], values["lightly"])
        return margin, None if error is None else 100 * error

    steps_margin, steps_se = points(at_steps)
    time_margin, time_se = points(at_time)
    return {
        "seeds": seeds,
        "equal_steps_margin": steps_margin,
        "equal_steps_margin_se": steps_se,
        "equal_time_margin": time_margin,
        "equal_time_margin_se": time_se,
        "per_seed": per_seed,
    }
