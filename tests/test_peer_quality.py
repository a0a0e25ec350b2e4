"""benchmarks/peer_quality.py's records: the report is made from the results folder alone (a session's
machine may not outlive it), and evaluate records each scored checkpoint once. Run as the script is run."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_quality.py"
SECONDS = {"ours": 3.0, "lightly": 3.0}  # equal step times: the equal-time margin is the equal-steps one
# Final linear top-1 by seed; the earlier checkpoint sits 5 points lower on every run.
FINAL = {"ours": {0: 0.90, 1: 0.88, 2: 0.89}, "lightly": {0: 0.80, 1: 0.77, 2: 0.79}}


def _script(*arguments: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, arguments)], capture_output=True, text=True, timeout=300)


def _write_records(records: Path) -> None:
    records.mkdir(parents=True)
    lines = []
    for side, by_seed in FINAL.items():
        for seed, top1 in by_seed.items():
            lines += [{"side": side, "seed": seed, "step": 100, "linear_top1": top1 - 0.05, "knn_top1": 0.5},
                      {"side": side, "seed": seed, "step": 200, "linear_top1": 0.10, "knn_top1": 0.5}]
            # A later line for the same checkpoint replaces the earlier one (a re-scored checkpoint).
            lines.append({"side": side, "seed": seed, "step": 200, "linear_top1": top1, "knn_top1": 0.6})
    (records / "evaluations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (records / "step_times.json").write_text(json.dumps({"median_seconds_per_step": SECONDS}))
    (records / "commands.jsonl").write_text(json.dumps({"date": "2026-12-08", "command": "python ..."}) + "\n")


def test_report_is_made_from_the_records_alone(tmp_path):
    results = tmp_path / "results"
    _write_records(results / "peer_quality")
    work_dir = tmp_path / "work"  # empty: no checkpoint and no evaluation folder exists any more

    done = _script("report", "--work_dir", work_dir, "--results_dir", results, "--max_steps", "200",
                   "--checkpoints", "2")
    assert done.returncode == 0, done.stderr

    report = json.loads((results / "peer_quality.json").read_text())
    differences = [FINAL["ours"][seed] - FINAL["lightly"][seed] for seed in (0, 1, 2)]
    welch = math.sqrt(sum(statistics.variance(FINAL[side].values()) / 3 for side in FINAL))
    assert report["seeds"] == [0, 1, 2]
    assert report["equal_steps_margin"] == pytest.approx(100 * statistics.fmean(differences))
    assert report["equal_steps_margin_se"] == pytest.approx(100 * welch)
    assert report["equal_time_margin"] == pytest.approx(report["equal_steps_margin"])
    assert report["targets_met"] == {"equal_steps_margin": True, "equal_time_margin": True, "seeds": True}
    first = report["runs"]["ours"]["0"][0]
    assert first == {"step": 100, "minutes": pytest.approx(5.0), "linear_top1": pytest.approx(0.85), "knn_top1": 0.5}
    assert (results / "peer_quality.png").stat().st_size > 0


def test_report_without_records_says_what_is_missing(tmp_path):
    done = _script("report", "--work_dir", tmp_path / "work", "--results_dir", tmp_path / "results")
    assert done.returncode != 0
    assert "step_times.json" in done.stderr and "Traceback" not in done.stderr


def test_evaluate_records_each_scored_checkpoint_once(tmp_path):
    work_dir, results = tmp_path / "work", tmp_path / "results"
    checkpoint = work_dir / "runs" / "ours-seed0" / "checkpoint-234"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    scored = work_dir / "eval" / "ours-seed0" / "checkpoint-234"
    scored.mkdir(parents=True)
    # Scored already (by an earlier attempt), so barlow-eval is not run again: only recorded.
    (scored / "eval_results.json").write_text(json.dumps({"linear_top1": 0.8632, "knn_top1": 0.8183}))

    for _ in range(2):
        done = _script("evaluate", "--work_dir", work_dir, "--results_dir", results, "--side", "ours", "--seeds", "0")
        assert done.returncode == 0, done.stderr
    lines = (results / "peer_quality" / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["side"], record["seed"], record["step"]) == ("ours", 0, 234)
    assert (record["linear_top1"], record["knn_top1"]) == (0.8632, 0.8183)
    commands = (results / "peer_quality" / "commands.jsonl").read_text().splitlines()
    assert len(commands) == 2 and "evaluate" in json.loads(commands[0])["command"]


def test_records_of_another_setting_are_refused(tmp_path):
    results = tmp_path / "results"
    _write_records(results / "peer_quality")
    report = ("report", "--work_dir", tmp_path / "work", "--results_dir", results, "--checkpoints", "2")
    assert _script(*report, "--max_steps", "200").returncode == 0  # the first command records its setting
    evaluations = (results / "peer_quality" / "evaluations.jsonl").read_text()

    ablation = _script(*report, "--max_steps", "200", "--lightly_optimizer", "ours")
    assert ablation.returncode != 0 and "Traceback" not in ablation.stderr
    assert "lightly_optimizer 'sgd' there, 'ours' here" in ablation.stderr
    assert (results / "peer_quality" / "evaluations.jsonl").read_text() == evaluations
    assert len((results / "peer_quality" / "commands.jsonl").read_text().splitlines()) == 2  # the refused one not logged
