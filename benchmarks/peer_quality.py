"""Learned quality side by side with lightly (issue #33): accuracy at equal steps and at equal wall-clock.

    apt-get install -y dataset-fashion-mnist                      # IDX files in /usr/share/datasets/fashion-mnist
    python benchmarks/peer_quality.py all --work_dir W --seeds 0 1 2 --max_steps 1170 --checkpoints 5
    python benchmarks/peer_quality.py pretrain --side lightly --seed 1 --work_dir W ...   # one run
    python benchmarks/peer_quality.py evaluate|timing|report --work_dir W ...

Both sides pretrain the same encoder (timm ResNet-18, small-image stem, 32 px; --backbone_kwargs)
on Fashion-MNIST's 60,000 training images with the same batch and the same number of steps, a
checkpoint at --checkpoints evenly spaced steps:

* ours: the installed ``barlow-pretrain`` with the recipe of benchmarks/fashion_mnist.py
  (configs/fmnist_small_image.yaml: LARS; projector 2048-2048-2048, no blur), a warm-up of a
  tenth of the steps, ``--mixed_precision bf16`` (where the CPU has bf16) and ``--channels_last``;
* lightly: benchmarks/peer_lightly.py, lightly's head, loss, transforms and optimiser as it
  recommends for 32 px images, in bf16 (same condition) and channels-last, both views in one forward
  (``--lightly_views separate`` for one forward each). ``--lightly_optimizer ours`` is an ablation:
  lightly's side with our optimiser, schedule and loss scale (run it in its own --work_dir).

Each checkpoint is evaluated by the installed ``barlow-eval`` on the full test split (linear
probe and kNN, k 20). Step times come from one alternating run of both training steps
(``timing``: benchmarks/train_step_cpu.py's ``build_ours`` and its measurement in common.py), so
the accuracy runs may share a busy machine; steps become minutes from the medians. ``report``
computes the margins (benchmarks/peer_margins.py) and writes --results_dir/peer_quality.json and
peer_quality.png. Every subcommand is resumable: pretraining continues from the newest
checkpoint, evaluations already written are kept, and each command's output is appended to
W/logs/<name>.log.

What the report is made from lives in --results_dir/peer_quality/, small enough to commit as it
lands: ``evaluations.jsonl`` (a line per scored checkpoint), ``step_times.json`` and
``commands.jsonl``. The work dir holds only what can be made again (data, checkpoints, logs): the
runs take hours spread over sessions, and a session's machine may not outlive it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, alternate, cpu_flags, machine, median, timed, versions  # noqa: E402
from fashion_mnist import IDX_DIR, SMALL_IMAGE_CONFIG, convert, read_idx  # noqa: E402

SIDES = ("ours", "lightly")
BIN = Path(sys.executable).parent  # the installed console scripts
TARGETS = {"equal_steps_margin": ">= -0.5", "equal_time_margin": ">= +0.5 and > 2 x equal_time_margin_se", "seeds": ">= 3"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["all", "pretrain", "evaluate", "timing", "report", "_lightly"])
    parser.add_argument("--work_dir", type=Path, required=True, help="data, runs, evaluations, logs")
    parser.add_argument("--side", choices=SIDES, help="pretrain: which side; evaluate: only this side (default both)")
    parser.add_argument("--seed", type=int, help="pretrain: the seed of the run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval_steps", type=int, nargs="+",
                        help="evaluate: only the checkpoints at these steps (default every checkpoint)")
    parser.add_argument("--max_steps", type=int, default=1170, help="optimizer steps per run (1170: 5 epochs)")
    parser.add_argument("--checkpoints", type=int, default=5, help="evenly spaced checkpoints per run (>= 4)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--backbone_kwargs", default="{}", help="timm resnet18 arguments, both sides")
    parser.add_argument("--projector_dims", type=int, nargs="+", default=[2048, 2048, 2048], help="ours")
    parser.add_argument("--mixed_precision", choices=["auto", "bf16", "no"], default="auto",
                        help="auto: bf16 where lscpu shows AVX512-BF16 or AMX, both sides")
    parser.add_argument("--lightly_views", choices=["joint", "separate"], default="joint")
    parser.add_argument("--lightly_optimizer", choices=["sgd", "ours"], default="sgd",
                        help="sgd: lightly's recipe; ours: an ablation with our LARS, schedule and loss scale on "
                             "lightly's side (use its own --work_dir)")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of each run")
    parser.add_argument("--max_train_samples", type=int, help="a smoke run's subset (pretraining and probes)")
    parser.add_argument("--max_eval_samples", type=int, help="a smoke run's test subset")
    parser.add_argument("--linear_epochs", type=int, help="barlow-eval's (default its 100)")
    parser.add_argument("--timing_runs", type=int, default=30, help="alternating timed steps per side")
    parser.add_argument("--idx_dir", type=Path, default=IDX_DIR)
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR,
                        help="where peer_quality.json, .png and the records folder peer_quality/ go "
                             "(a smoke run: somewhere else)")
    parser.add_argument("--resume_from_checkpoint", choices=["latest"],
                        help="pretrain: continue from the newest checkpoint (all: always does)")
    args = parser.parse_args(argv)
    if args.max_steps % args.checkpoints or args.checkpoints < 1:
        parser.error("--max_steps must be a multiple of --checkpoints (evenly spaced checkpoints, the last at the end).")
    if args.command == "pretrain" and (args.side is None or args.seed is None):
        parser.error("pretrain needs --side and --seed.")
    return args


def bf16(args: argparse.Namespace) -> bool:
    if args.mixed_precision == "auto":
        flags = cpu_flags()
        return flags["avx512_bf16"] or flags["amx_bf16"]
    return args.mixed_precision == "bf16"


def run_dir(args: argparse.Namespace, side: str, seed: int) -> Path:
    return args.work_dir / "runs" / f"{side}-seed{seed}"


def records_dir(args: argparse.Namespace) -> Path:
    """The results_dir folder of what the report is made from (evaluations, step times, commands)."""
    folder = args.results_dir / "peer_quality"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_setting(args: argparse.Namespace) -> None:
    """Records of one setting only: the first command writes it to setting.json, and a command with
    another (the optimiser ablation, a smoke run) is refused before it can mix its records in."""
    setting = {"max_steps": args.max_steps, "checkpoints": args.checkpoints, "batch_size": args.batch_size,
               "backbone_kwargs": json.loads(args.backbone_kwargs), "projector_dims": args.projector_dims,
               "bf16": bf16(args), "lightly_views": args.lightly_views, "lightly_optimizer": args.lightly_optimizer,
               "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples,
               "linear_epochs": args.linear_epochs}
    path = records_dir(args) / "setting.json"
    if not path.is_file():
        path.write_text(json.dumps(setting, indent=2) + "\n")
        return
    recorded = json.loads(path.read_text())
    if recorded != setting:
        differences = ", ".join(f"{key} {recorded.get(key)!r} there, {value!r} here"
                                for key, value in setting.items() if recorded.get(key) != value)
        raise SystemExit(f"{path.parent} holds the records of another setting ({differences}): "
                         "give this one its own --results_dir.")


def recorded_evaluations(args: argparse.Namespace) -> dict[tuple[str, int, int], dict]:
    """Every line of evaluations.jsonl by (side, seed, step); a later line of the same checkpoint wins."""
    path = records_dir(args) / "evaluations.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return {(r["side"], r["seed"], r["step"]): r for r in records}


def record_evaluation(args: argparse.Namespace, side: str, seed: int, folder: Path, result: Path) -> None:
    """Append barlow-eval's ``result`` of checkpoint ``folder`` to evaluations.jsonl, once."""
    step = int(folder.name.split("-")[1])
    if (side, seed, step) in recorded_evaluations(args):
        return
    values = json.loads(result.read_text())
    scored = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(result.stat().st_mtime))
    line = {"side": side, "seed": seed, "step": step, "linear_top1": values["linear_top1"],
            "knn_top1": values["knn_top1"], "date": scored, "eval_results": values}
    with open(records_dir(args) / "evaluations.jsonl", "a") as records:
        records.write(json.dumps(line) + "\n")


def run_logged(command: list[str], log_name: str, args: argparse.Namespace) -> None:
    """Run ``command``, its output appended to W/logs/<log_name>.log (kept across attempts); fail loudly."""
    logs = args.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{log_name}.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(map(str, command))}\n")
        log.flush()
        status = subprocess.run(list(map(str, command)), stdout=log, stderr=subprocess.STDOUT).returncode
    if status:
        raise SystemExit(f"{command[0]} failed with status {status}; see {logs / f'{log_name}.log'}")


def data_dir(args: argparse.Namespace) -> Path:
    return convert(args.idx_dir, args.work_dir / "data")  # parquet shards of the IDX files, made once


def ours_command(args: argparse.Namespace, seed: int, resume: bool) -> list[str]:
    """barlow-pretrain with the recipe of benchmarks/fashion_mnist.py (its own argument list)."""
    from fashion_mnist import _pretrain_args
    from peer_lightly import OUR_WARMUP_RATIO

    recipe = argparse.Namespace(
        backbone_kwargs=args.backbone_kwargs, image_size=32, projector_dims=args.projector_dims,
        batch_size=args.batch_size, smoke=False, blur_probability=[0.0, 0.0], min_crop_scale=0.08, seed=seed,
        pretrain_config=SMALL_IMAGE_CONFIG,
    )
    cap = ["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []
    speed = ["--mixed_precision", "bf16" if bf16(args) else "no", "--channels_last",
             "--dataloader_num_workers", str(args.workers)]
    out = run_dir(args, "ours", seed)
    command = [BIN / "barlow-pretrain", *_pretrain_args(recipe, data_dir(args), out, "1000", speed, cap),
               "--max_train_steps", str(args.max_steps), "--warmup_ratio", str(OUR_WARMUP_RATIO),
               "--checkpointing_steps", str(args.max_steps // args.checkpoints)]
    from training.shared.checkpointing import find_latest_checkpoint

    if resume and find_latest_checkpoint(out) is not None:
        command += ["--resume_from_checkpoint", "latest"]
    return command


def pretrain(args: argparse.Namespace, side: str, seed: int, resume: bool) -> None:
    """One run, in a child process whose output goes to W/logs; ``resume``: from its newest
    checkpoint (without it, a run folder that holds checkpoints is refused)."""
    out = run_dir(args, side, seed)
    if (out / "metrics.json").is_file():
        print(f"{out} is complete.")
        return
    if side == "ours":
        run_logged(ours_command(args, seed, resume), f"pretrain-ours-seed{seed}", args)
    else:  # this script's hidden _lightly command, with the same options
        command = [sys.executable, Path(__file__).resolve(), "_lightly", *sys.argv[2:], "--side", "lightly",
                   "--seed", str(seed), *(["--resume_from_checkpoint", "latest"] if resume else [])]
        run_logged(command, f"pretrain-lightly-seed{seed}", args)


def lightly_pretrain(args: argparse.Namespace) -> None:
    """The lightly run itself (in the child process that pretrain starts)."""
    from peer_lightly import pretrain as lightly_run

    images = read_idx(args.idx_dir / "train-images-idx3-ubyte.gz")[: args.max_train_samples]
    metrics = lightly_run(
        run_dir(args, "lightly", args.seed), images, seed=args.seed, batch_size=args.batch_size,
        max_steps=args.max_steps, checkpointing_steps=args.max_steps // args.checkpoints, bf16=bf16(args),
        joint_views=args.lightly_views == "joint", backbone_kwargs=json.loads(args.backbone_kwargs),
        resume=args.resume_from_checkpoint == "latest", num_workers=args.workers,
        optimizer_name=args.lightly_optimizer,
    )
    print(json.dumps(metrics))


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints that barlow-eval can read (config.json present), by step."""
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "config.json").is_file()]
    return sorted(found)


def evaluate(args: argparse.Namespace) -> None:
    """barlow-eval (linear and kNN on the test split) on every checkpoint not evaluated yet, the
    features extracted in the pretraining's precision (bf16 autocast where the CPU has bf16: about
    1.8x the images/s of fp32 here, the same kNN top-1 within 0.1 point on a check with 4,000
    training and 1,000 test images)."""
    cap = [*(["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []),
           *(["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else []),
           *(["--linear_epochs", str(args.linear_epochs)] if args.linear_epochs else [])]
    for side, seed, folder in evaluation_order(args):
        out = args.work_dir / "eval" / f"{side}-seed{seed}" / folder.name
        if not (out / "eval_results.json").is_file():
            run_logged([BIN / "barlow-eval", "--model_name_or_path", folder, "--dataset_name", data_dir(args),
                        "--no_streaming", "--eval_split", "test", "--protocol", "linear", "knn", "--knn_k", "20",
                        "--no_cache_features", "--dataloader_num_workers", str(args.workers), *cap,
                        "--mixed_precision", "bf16" if bf16(args) else "no",
                        "--output_dir", out, "--overwrite_output_dir"], f"eval-{side}-seed{seed}", args)
        record_evaluation(args, side, seed, folder, out / "eval_results.json")


def evaluation_order(args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """(side, seed, checkpoint folder) of every checkpoint (of --side and --eval_steps where given):
    each run's newest first, by seed, ours before lightly, so the equal-steps comparison is readable
    before the curves are; then the rest."""
    newest, rest = [], []
    for seed in args.seeds:
        for side in [args.side] if args.side else SIDES:
            found = [(step, folder) for step, folder in checkpoint_steps(run_dir(args, side, seed))
                     if args.eval_steps is None or step in args.eval_steps]
            newest += [(side, seed, folder) for _, folder in found[-1:]]
            rest += [(side, seed, folder) for _, folder in found[:-1]]
    return newest + rest


def timing(args: argparse.Namespace) -> dict:
    """Both training steps timed in one alternating run (train_step_cpu's ``build_ours`` for ours,
    with this comparison's encoder and projector; peer_lightly's step for lightly): step_times.json
    in the records folder."""
    from unittest import mock

    import torch

    import train_step_cpu
    from peer_lightly import build as build_lightly, encoder_config

    use_bf16 = bf16(args)
    config = encoder_config(json.loads(args.backbone_kwargs), projector_dims=args.projector_dims)
    # build_ours builds train_step_cpu's network; ours here is this comparison's, so its config is swapped in.
    with mock.patch.object(train_step_cpu, "_config", lambda hp: config):
        _, _, ours_step = train_step_cpu.build_ours(train_step_cpu._paper_hyper_parameters(), args.batch_size,
                                                    compile=False, bf16=use_bf16)
    _, _, _, lightly_step = build_lightly(config, args.batch_size, 10**6, use_bf16, args.lightly_views == "joint",
                                          optimizer=args.lightly_optimizer)
    x1, x2 = train_step_cpu._inputs(args.batch_size)
    steps = {"ours": ours_step, "lightly": lightly_step}
    contenders = {side: (lambda step=step: timed(lambda: step(x1, x2))) for side, step in steps.items()}
    first = {side: contenders[side]() for side in SIDES}  # warm-up, untimed in the medians
    samples = alternate(contenders, runs=args.timing_runs, warmup=0)
    record = {
        "median_seconds_per_step": {side: median(samples[side]) for side in SIDES},
        # Each round runs both steps back to back, so their ratio shares the machine's state of the moment.
        "median_paired_ratio_ours_over_lightly": median([o / t for o, t in zip(samples["ours"], samples["lightly"])]),
        "seconds_per_step": samples, "first_step_seconds": first, "runs": args.timing_runs,
        "bf16": use_bf16, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "method": "one process, the two steps alternating (order flipped every round) on the same random batch "
                  "(benchmarks/common.py alternate); ours: train_step_cpu.build_ours(compile=False) as barlow-pretrain "
                  "--channels_last runs it; lightly: peer_lightly.build's step; data loading not included",
    }
    (records_dir(args) / "step_times.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["median_seconds_per_step"]))
    return record


def _lscpu() -> dict:
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                  .splitlines() if ":" in line)
    return {"model_name": fields.get("Model name", "").strip(), "flags": fields.get("Flags", "").split()}


def report(args: argparse.Namespace) -> dict:
    """Margins, every run's numbers and the picture, from the records folder alone (no checkpoint
    needs to exist any more)."""
    from peer_lightly import OUR_WARMUP_RATIO, recipe
    from peer_margins import margins

    records = records_dir(args)
    for needed in ("step_times.json", "evaluations.jsonl", "commands.jsonl"):
        if not (records / needed).is_file():
            raise SystemExit(f"{records / needed} is missing: the report needs timing's step times and evaluate's "
                             "records there (--results_dir names the folder above it).")
    step_times = json.loads((records / "step_times.json").read_text())
    seconds = step_times["median_seconds_per_step"]
    runs: dict[str, dict[int, list[dict]]] = {side: {} for side in SIDES}
    sources: dict[str, int] = {}  # how each evaluation came to be recorded, counted
    for (side, seed, step), values in sorted(recorded_evaluations(args).items()):
        if seed in args.seeds:
            source = values.get("source", "barlow-eval by this script's evaluate (its eval_results.json in the line)")
            sources[source] = sources.get(source, 0) + 1
            runs[side].setdefault(seed, []).append({
                "step": step, "minutes": step * seconds[side] / 60,
                "linear_top1": values["linear_top1"], "knn_top1": values["knn_top1"]})
    try:
        summary = margins({side: {seed: [(p["step"], p["linear_top1"]) for p in points]
                                  for seed, points in by_seed.items()} for side, by_seed in runs.items()}, seconds)
    except ValueError as error:  # no seed with both sides, or no shared checkpoint step
        raise SystemExit(f"No margins from {records / 'evaluations.jsonl'}: {error}") from None
    commands = [json.loads(line) for line in (records / "commands.jsonl").read_text().splitlines()]
    record = {
        **summary,
        "targets": TARGETS,
        "targets_met": {
            "equal_steps_margin": summary["equal_steps_margin"] >= -0.5,
            "equal_time_margin": summary["equal_time_margin"] >= 0.5 and summary["equal_time_margin_se"] is not None
                                 and summary["equal_time_margin"] > 2 * summary["equal_time_margin_se"],
            "seeds": len(summary["seeds"]) >= 3,
        },
        "runs": runs,
        "evaluation_sources": sources,
        "step_times": step_times,
        "setting": {
            "data": f"Fashion-MNIST (Debian's IDX files), {args.max_train_samples or 60000} training images, "
                    f"test split {args.max_eval_samples or 10000} images",
            "backbone": f"timm resnet18 {args.backbone_kwargs}, small-image stem, 32 px, both sides",
            "steps": args.max_steps, "checkpoints": args.checkpoints, "batch_size": args.batch_size,
            "mixed_precision": "bf16 autocast, both sides" if bf16(args) else "fp32 (no bf16 instructions), both sides",
            "ours": f"barlow-pretrain, configs/fmnist_small_image.yaml (LARS), projector {args.projector_dims}, "
                    f"no blur, crops 0.08-1, warm-up {OUR_WARMUP_RATIO:.0%} of the steps, channels-last",
            "lightly": {**recipe(args.lightly_optimizer), "views": f"{args.lightly_views} forward",
                        "memory_format": "channels-last"},
            "evaluation": "barlow-eval --protocol linear knn --knn_k 20 --eval_split test (SGD linear probe, "
                          f"{args.linear_epochs or 100} epochs; features under "
                          f"{'bf16 autocast' if bf16(args) else 'fp32'}), one evaluator for both sides",
        },
        "cpu": {**machine(), "lscpu": _lscpu()},
        "versions": versions(),
        "commands": commands,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "peer_quality.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(runs, args.results_dir / "peer_quality.png")
    print(json.dumps({k: summary[k] for k in summary if k != "per_seed"}, indent=2))
    return record


def plot(runs: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """Linear top-1 against wall-clock minutes: a thin line per seed, a thick mean per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for side, colour in zip(SIDES, ("tab:blue", "tab:orange")):
        for points in runs[side].values():
            axes.plot([p["minutes"] for p in points], [100 * p["linear_top1"] for p in points], color=colour,
                      linewidth=0.8, alpha=0.5)
        steps = sorted(set.intersection(*({p["step"] for p in points} for points in runs[side].values())))
        by_step = [[p for points in runs[side].values() for p in points if p["step"] == s] for s in steps]
        seeds = f"{len(runs[side])} seed{'s' if len(runs[side]) > 1 else ''}"
        axes.plot([ps[0]["minutes"] for ps in by_step], [100 * np.mean([p["linear_top1"] for p in ps]) for ps in by_step],
                  color=colour, linewidth=2.5, label=f"{side} (mean of {seeds})")
    axes.set_xlabel("wall-clock minutes (steps x median step time)")
    axes.set_ylabel("linear top-1 (%), Fashion-MNIST test")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.command != "_lightly":
        check_setting(args)
        with open(records_dir(args) / "commands.jsonl", "a") as log:
            log.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": shlex.join(["python", "benchmarks/peer_quality.py", *sys.argv[1:]])}) + "\n")
    if args.command == "_lightly":
        lightly_pretrain(args)
    elif args.command == "pretrain":
        pretrain(args, args.side, args.seed, resume=args.resume_from_checkpoint == "latest")
    elif args.command == "evaluate":
        evaluate(args)
    elif args.command == "timing":
        timing(args)
    elif args.command == "report":
        report(args)
    else:  # all: every run (resumed where it stopped), the timing once, the evaluations, the report
        for seed in args.seeds:
            for side in SIDES:
                pretrain(args, side, seed, resume=True)
        if not (records_dir(args) / "step_times.json").is_file():
            timing(args)
        evaluate(args)
        report(args)


if __name__ == "__main__":
    main()
