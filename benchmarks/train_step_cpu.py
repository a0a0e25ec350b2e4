"""One Barlow Twins training step on the CPU: ours against lightly, images per second and peak memory.

    python benchmarks/train_step_cpu.py
    python benchmarks/train_step_cpu.py --mixed_precision bf16    # results/train_step_cpu_bf16.json

Both contenders train the same timm ResNet-18 (small-image stem, 32 px; built by our
``BarlowTwinsModel`` from one seed, and checked to hold the same weights) on the same two random
batches of 256 images (512 views through the backbone per step):

* ours: ``BarlowTwinsForPreTraining`` (projector 8192-8192-8192, ``barlow_twins_loss`` on its
  automatic path, Gram here since N = 256 < D = 8192) and ``create_optimizer(model, "lars", ...)``,
  channels-last and compiled with an activation memory budget of 0.3, as
  ``barlow-pretrain --channels_last --torch_compile --activation_memory_budget 0.3`` runs it;
* ours_eager (reported in details): the same with ``--channels_last`` only;
* baseline: the same backbone, lightly's ``BarlowTwinsProjectionHead(512, 8192, 8192)``,
  ``BarlowTwinsLoss`` and ``LARS`` with the same hyper-parameters and the same two groups
  (multi-dimensional weights with decay and adaptation; biases and norm parameters with neither,
  which lightly's LARS does for any group whose weight decay is 0), one forward per view;
* baseline_one_forward: the same with both views in one forward, ``model(torch.cat([x1, x2]))``,
  as lightly's own benchmark runs it (its BatchNorms then mix the two views' statistics). Since
  issue #32 this is the headline baseline: ours also runs both views in one forward, but keeps each
  view's BatchNorm statistics its own, exactly as two forwards.

One step is: forward of both views, loss, backward, ``optimizer.step()``, ``zero_grad()``.
Learning rates, weight decay and lambda are the defaults of ``training/arguments.py``.

``--mixed_precision bf16``: ours and ours_eager run their forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``, as accelerate does for ``barlow-pretrain
--mixed_precision bf16`` on a CPU (the loss is computed in fp32 whatever the autocast); lightly runs
in fp32 (baseline) and under the same autocast, forward and loss (baseline_bf16,
baseline_one_forward_bf16: the headline), and ours_fp32 (ours in fp32) joins for the bf16 speed-up
alone. ``--contenders`` times a subset, ``--skip_memory`` skips the memory workers. Then
``--trajectory_steps`` (50) training steps of ours in bf16 and in fp32, alternating, from the same
weights on the same sequence of batches (two views of Fashion-MNIST images made by the trainer's
augmentation, or of scikit-learn's digits without the IDX files), give the two loss trajectories;
bf16's must stay within ``TRAJECTORY_TOLERANCE`` of fp32's at every step. Without AVX512-BF16 or AMX
(lscpu flags) nothing is measured: bf16 is emulated there, and the JSON says so.

Time: one untimed warm-up step each (where ours compiles), then ``common.alternate``, ``--runs``
runs of ``--steps_per_run`` steps each; medians. Memory: each contender in its own process
(``--memory_worker NAME``), peak resident set above the one right after the imports, over building
the model and optimizer and two steps (so parameters, gradients, momentum buffers and, for ours,
compilation all count). ``--profile`` prints where a step's time goes (each part timed alone,
plus torch.profiler's top operators) and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    alternate,
    cpu_flags,
    measure_peak_above_start,
    median,
    run_memory_worker,
    timed,
    write_not_measured,
    write_result,
)


NAME = "train_step_cpu"
TARGET = "ratio >= 1.3, memory_ratio <= 0.8"
BF16_TARGET = "ratio >= 2.0 (against lightly in fp32)"
# Relative difference of the bf16 loss from the fp32 loss allowed at every step of the trajectory.
TRAJECTORY_TOLERANCE = 0.05
IMAGE_SIZE = 32
PROJECTOR = [8192, 8192, 8192]
SEED = 0
# Ours keeps 30% of the activations the compiled backward would save, recomputing the rest.
ACTIVATION_MEMORY_BUDGET = 0.3


def _paper_hyper_parameters() -> dict:
    """The defaults of training/arguments.py (read, not copied, so the two cannot drift apart)."""
    from training.arguments import ModelArguments, PretrainingArguments

    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    return {
        "learning_rate_weights": default(PretrainingArguments, "learning_rate_weights"),
        "learning_rate_biases": default(PretrainingArguments, "learning_rate_biases"),
        "weight_decay": default(PretrainingArguments, "weight_decay"),
        "off_diagonal_weight": default(ModelArguments, "off_diagonal_weight"),
        "momentum": 0.9,
        "trust_coefficient": 0.001,
    }


def _config(hp: dict):
    from modeling_barlow import BarlowTwinsConfig

    return BarlowTwinsConfig(
        backbone="resnet18",
        small_image_stem=True,
        image_size=IMAGE_SIZE,
        projector_dims=PROJECTOR,
        off_diagonal_weight=hp["off_diagonal_weight"],
    )


def build_ours(
    hp: dict, batch_size: int, compile: bool = True, budget: float | None = ACTIVATION_MEMORY_BUDGET, bf16: bool = False,
):
    """Our model and optimizer, and one training step over (x1, x2).

    As ``barlow-pretrain --channels_last --torch_compile --activation_memory_budget 0.3`` runs it
    (``compile=False``: with ``--channels_last`` only). accelerate's ``dynamo_backend="inductor"``
    is ``torch.compile(model)``, and the trainer runs under ``compile_settings`` as here. ``bf16``:
    the forward under CPU autocast, as accelerate runs ``--mixed_precision bf16`` on a CPU.
    """
    from modeling_barlow import BarlowTwinsForPreTraining
    from training.shared.optim import create_optimizer
    from training.pretraining.run import compile_settings

    torch.manual_seed(SEED)
    model = BarlowTwinsForPreTraining(_config(hp)).train()
    optimizer = create_optimizer(
        model,
        "lars",
        hp["learning_rate_weights"],
        hp["learning_rate_biases"],
        hp["weight_decay"],
        global_batch_size=batch_size,
        momentum=hp["momentum"],
        trust_coefficient=hp["trust_coefficient"],
    )

    # Our fast path, as `barlow-pretrain --channels_last`: oneDNN's convolutions are faster in NHWC on
    # the CPU too. The inputs' conversion is inside the timed step.
    model.to(memory_format=torch.channels_last)
    # inductor fuses BatchNorm, ReLU and the residual adds, and its partitioner recomputes such
    # cheap element-wise results in the backward instead of keeping them: faster and smaller.
    forward = torch.compile(model) if compile else model

    def step(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        with compile_settings(budget if compile else None):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = forward(x1, x2).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return model, optimizer, step


def _backbone(hp: dict) -> torch.nn.Module:
    """The timm backbone exactly as our model builds it (same seed first, so the same weights)."""
    from modeling_barlow import BarlowTwinsModel

    torch.manual_seed(SEED)
    return BarlowTwinsModel(_config(hp)).backbone


def build_baseline(hp: dict, batch_size: int, one_forward: bool = False, bf16: bool = False):
    """The same backbone with lightly's head, loss and LARS, and one training step over (x1, x2).

    ``one_forward``: both views through the network in one forward, ``model(torch.cat([x1, x2]))``,
    as lightly's own benchmark runs it (its BatchNorms then mix the two views' statistics); otherwise
    one forward per view. ``bf16``: the forward and the loss under CPU autocast to bf16, as
    Lightning's ``precision="bf16-mixed"`` runs lightly's benchmarks.
    """
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead
    from lightly.utils.lars import LARS

    backbone = _backbone(hp)
    head = BarlowTwinsProjectionHead(backbone.num_features, PROJECTOR[0], PROJECTOR[-1])
    model = torch.nn.Sequential(backbone, head).train()
    criterion = BarlowTwinsLoss(lambda_param=hp["off_diagonal_weight"])
    # The paper's two groups, scaled like create_optimizer (lr * batch / 256); lightly's LARS skips
    # the trust ratio for any parameter whose group has weight decay 0, i.e. the biases group.
    scale = batch_size / 256
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = LARS(
        [
            {"params": weights, "lr": hp["learning_rate_weights"] * scale, "weight_decay": hp["weight_decay"]},
            {"params": biases, "lr": hp["learning_rate_biases"] * scale, "weight_decay": 0.0},
        ],
        lr=hp["learning_rate_weights"] * scale,
        momentum=hp["momentum"],
        trust_coefficient=hp["trust_coefficient"],
    )

    def step(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if one_forward:
                z1, z2 = model(torch.cat([x1, x2])).chunk(2)
            else:
                z1, z2 = model(x1), model(x2)
            loss = criterion(z1, z2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return model, optimizer, step


BUILDERS = {
    "ours": build_ours,
    "ours_eager": lambda hp, batch_size: build_ours(hp, batch_size, compile=False),
    "baseline": build_baseline,
    "baseline_one_forward": lambda hp, batch_size: build_baseline(hp, batch_size, one_forward=True),
}
BF16_BUILDERS = {
    "ours": lambda hp, batch_size: build_ours(hp, batch_size, bf16=True),
    "ours_eager": lambda hp, batch_size: build_ours(hp, batch_size, compile=False, bf16=True),
    "ours_fp32": build_ours,
    "baseline": build_baseline,
    "baseline_bf16": lambda hp, batch_size: build_baseline(hp, batch_size, bf16=True),
    "baseline_one_forward_bf16": lambda hp, batch_size: build_baseline(hp, batch_size, one_forward=True, bf16=True),
}
# The headline comparison (issue #32): lightly as its own benchmark runs it, both views in one
# forward, in the same precision as ours.
HEADLINE_BASELINE = {"no": "baseline_one_forward", "bf16": "baseline_one_forward_bf16"}
TARGETS_32 = {"no": "ratio >= 1.45 (ours against lightly's one-forward step, both fp32)",
              "bf16": "ratio >= 1.4 (ours bf16 against lightly's one-forward bf16 step)"}


def builders(mixed_precision: str) -> dict:
    return BF16_BUILDERS if mixed_precision == "bf16" else BUILDERS


def _inputs(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def memory_worker(name: str, args: argparse.Namespace) -> None:
    """Peak resident set above the one right after the imports, over building the model and
    optimizer and two steps (so parameters, gradients, momentum buffers and, for the compiled
    contender, compilation all count); prints one JSON line."""
    torch.set_num_threads(args.threads)
    hp = _paper_hyper_parameters()
    x1, x2 = _inputs(args.batch_size)

    def build_and_step() -> None:
        _, _, step = builders(args.mixed_precision)[name](hp, args.batch_size)
        for _ in range(2):
            step(x1, x2)

    peak = measure_peak_above_start(build_and_step)
    print(json.dumps({"contender": name, "peak_bytes": peak}))


def _same_backbone(ours, baseline) -> bool:
    a, b = ours.barlow_twins.backbone.state_dict(), baseline[0].state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def profile(args: argparse.Namespace) -> None:
    """Where one step's time goes, each part timed alone after a warm-up step; prints only."""
    from lightly.loss import BarlowTwinsLoss

    from modeling_barlow import barlow_twins_loss

    hp = _paper_hyper_parameters()
    x1, x2 = _inputs(args.batch_size)
    ours, ours_opt, ours_step = build_ours(hp, args.batch_size)
    base, base_opt, base_step = build_baseline(hp, args.batch_size)
    ours_step(x1, x2), base_step(x1, x2)  # warm-up; allocates the momentum buffers

    def fwd_bwd(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out) if out.ndim else None)
        return run

    backbone = ours.barlow_twins
    pooled = backbone(x1).pooler_output.detach().requires_grad_()
    z1 = ours.projector(pooled).detach().requires_grad_()
    z2 = ours.projector(backbone(x2).pooler_output.detach()).detach().requires_grad_()
    lightly_loss = BarlowTwinsLoss(lambda_param=hp["off_diagonal_weight"])
    parts = {
        "backbone fwd+bwd, 2 views": fwd_bwd(lambda: backbone(x1).pooler_output.sum() + backbone(x2).pooler_output.sum()),
        "our projector fwd+bwd, 2 views": fwd_bwd(lambda: ours.projector(pooled).sum() * 2),
        "lightly head fwd+bwd, 2 views": fwd_bwd(lambda: base[1](pooled).sum() * 2),
        "our loss fwd+bwd (Gram)": fwd_bwd(lambda: barlow_twins_loss(z1, z2, hp["off_diagonal_weight"]).loss),
        "lightly loss fwd+bwd": fwd_bwd(lambda: lightly_loss(z1, z2)),
    }
    # Optimizer steps need gradients: one backward each, then time step() alone.
    ours(x1, x2).loss.backward()
    base_loss = lightly_loss(base(x1), base(x2))
    base_loss.backward()
    times = {name: timed(fn) for name, fn in parts.items()}
    times["our LARS step (timm Lars)"] = timed(ours_opt.step)
    times["lightly LARS step"] = timed(base_opt.step)
    ours_opt.zero_grad(), base_opt.zero_grad()
    for name, seconds in times.items():
        print(f"{name:40s} {seconds:8.2f} s")
    for name, step in (("ours", ours_step), ("baseline", base_step)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(x1, x2)
        print(f"\n=== torch.profiler, one full step: {name} ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def _trajectory_images(count: int = 60_000):
    """Fashion-MNIST's training images as (N, 28, 28) uint8 if its IDX files are installed, else
    scikit-learn's digits scaled to 0-255; and which."""
    import numpy as np

    from fashion_mnist import IDX_DIR, read_idx

    path = IDX_DIR / "train-images-idx3-ubyte.gz"
    if path.is_file():
        return read_idx(path)[:count], "Fashion-MNIST (train split)"
    from sklearn.datasets import load_digits

    return (load_digits().images * 255 / 16).astype(np.uint8), "scikit-learn digits (no Fashion-MNIST IDX files)"


def trajectory(hp: dict, batch_size: int, steps: int) -> dict:
    """Ours in bf16 and in fp32 (compiled, channels-last, as timed), from the same weights, trained
    for ``steps`` LARS steps on the same batches, alternating; the two loss trajectories."""
    from PIL import Image
    from torchvision.transforms import v2

    from training.shared.augment import TwoViewTransform

    images, source = _trajectory_images()
    config = _config(hp)
    transform = TwoViewTransform(config.image_size, config.image_mean, config.image_std, 3,
                                 v2.InterpolationMode(config.interpolation))
    contenders = {name: build_ours(hp, batch_size, bf16=name == "bf16")[2] for name in ("bf16", "fp32")}
    losses = {name: [] for name in contenders}
    for step in range(steps):
        picks = torch.randint(len(images), (batch_size,), generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)  # the augmentation's draws
        pairs = [transform(Image.fromarray(images[int(i)])) for i in picks]
        x1, x2 = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        for name in (("bf16", "fp32") if step % 2 == 0 else ("fp32", "bf16")):
            losses[name].append(float(contenders[name](x1, x2)))
        print(f"trajectory step {step + 1}/{steps}: bf16 {losses['bf16'][-1]:.2f}, fp32 {losses['fp32'][-1]:.2f}", flush=True)
    relative = [abs(b - f) / abs(f) for b, f in zip(losses["bf16"], losses["fp32"])]
    return {
        "steps": steps,
        "data": f"{source}, two views per image from training.shared.augment.TwoViewTransform (the paper's), {batch_size} images per step",
        "tolerance": f"|loss_bf16 - loss_fp32| / loss_fp32 <= {TRAJECTORY_TOLERANCE} at every step",
        "max_relative_difference": round(max(relative), 5),
        "mean_relative_difference": round(sum(relative) / len(relative), 5),
        "relative_difference_at_last_step": round(relative[-1], 5),
        "within_tolerance": max(relative) <= TRAJECTORY_TOLERANCE,
        "loss_bf16": [round(v, 3) for v in losses["bf16"]],
        "loss_fp32": [round(v, 3) for v in losses["fp32"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=256, help="Images per view per step.")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per contender (alternating).")
    parser.add_argument("--steps_per_run", type=int, default=1, help="Training steps in one timed run.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both contenders.")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="bf16: ours under CPU autocast, against lightly in fp32 (results/train_step_cpu_bf16.json).")
    parser.add_argument("--trajectory_steps", type=int, default=50,
                        help="With --mixed_precision bf16: steps of the bf16 against fp32 loss trajectory (0: skip).")
    parser.add_argument("--memory_worker", choices=sorted(set(BUILDERS) | set(BF16_BUILDERS)), help=argparse.SUPPRESS)
    parser.add_argument("--contenders", help="Comma-separated subset of the mode's contenders (default: all); "
                        "must hold ours and the headline baseline (lightly's one-forward step).")
    parser.add_argument("--skip_memory", action="store_true", help="Time only: no peak-memory worker processes.")
    parser.add_argument("--profile", action="store_true", help="Print where a step's time goes; write nothing.")
    parser.add_argument("--profile_rows", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    if args.profile:
        return profile(args)
    bf16 = args.mixed_precision == "bf16"
    name = f"{NAME}_bf16" if bf16 else NAME
    flags = cpu_flags()
    if bf16 and not (flags["avx512_bf16"] or flags["amx_bf16"]):
        return write_not_measured(name, "not measured: no bf16 CPU instructions (neither AVX512-BF16 nor AMX in lscpu)")

    started = time.perf_counter()
    load_before = os.getloadavg()
    hp = _paper_hyper_parameters()
    x1, x2 = _inputs(args.batch_size)
    contender_builders = builders(args.mixed_precision)
    headline = HEADLINE_BASELINE[args.mixed_precision]
    if args.contenders:
        wanted = args.contenders.split(",")
        if not {"ours", headline} <= set(wanted) <= set(contender_builders):
            raise SystemExit(f"--contenders: a subset of {sorted(contender_builders)} holding ours and {headline}")
        contender_builders = {c: b for c, b in contender_builders.items() if c in wanted}
    models, steps = {}, {}
    for contender, build in contender_builders.items():
        models[contender], _, steps[contender] = build(hp, args.batch_size)
    ours_names = [contender for contender in contender_builders if contender.startswith("ours")]
    lightly_names = [contender for contender in contender_builders if contender.startswith("baseline")]
    if not all(_same_backbone(models[o], models[b]) for o in ours_names for b in lightly_names):
        raise RuntimeError("the contenders' backbones differ; the comparison would not be like for like")
    losses = {contender: [] for contender in contender_builders}

    def run(contender):
        def one_run() -> float:
            def steps_of_run():
                for _ in range(args.steps_per_run):
                    losses[contender].append(float(steps[contender](x1, x2)))
            return timed(steps_of_run) / args.steps_per_run
        return one_run

    # One untimed warm-up step each; for "ours" it is where torch.compile compiles (minutes here).
    contenders = {contender: run(contender) for contender in contender_builders}
    first_step_seconds = {contender: contenders[contender]() for contender in contender_builders}
    samples = alternate(contenders, runs=args.runs, warmup=0)
    models.clear(), steps.clear()  # free them before the memory workers start
    worker_args = ["--batch_size", str(args.batch_size), "--threads", str(args.threads),
                   "--mixed_precision", args.mixed_precision]
    memory = {} if args.skip_memory else {
        contender: run_memory_worker(Path(__file__), [*worker_args, "--memory_worker", contender])["peak_bytes"]
        for contender in contender_builders
    }
    seconds = {contender: median(values) for contender, values in samples.items()}
    images = {contender: args.batch_size / s for contender, s in seconds.items()}
    precision = " under CPU autocast to bf16 (as barlow-pretrain --mixed_precision bf16; the loss in fp32)" if bf16 else ""
    details = {
        "batch_size_per_view": args.batch_size,
        "views_per_step": 2 * args.batch_size,
        "image_size": IMAGE_SIZE,
        "backbone": "timm resnet18, small-image stem (3x3/1 conv, no max-pool), same weights for both",
        "projector": PROJECTOR,
        "hyper_parameters": hp,
        "mixed_precision": args.mixed_precision,
        "ours": f"BarlowTwinsForPreTraining, channels-last and torch.compile with an activation memory budget of {ACTIVATION_MEMORY_BUDGET} (as barlow-pretrain --channels_last --torch_compile --activation_memory_budget {ACTIVATION_MEMORY_BUDGET}) + barlow_twins_loss (auto: Gram) + training.shared.optim.create_optimizer('lars') (timm Lars){precision}",
        "ours_eager": f"the same without torch.compile (as barlow-pretrain --channels_last){precision}",
        "headline_baseline": headline,
        "earlier_target": f"{BF16_TARGET if bf16 else TARGET}, against 'baseline' (lightly, one forward per view, fp32): see ratios",
        # Every one of ours against every lightly form: its seconds per step / ours.
        "ratios": {o: {b: round(seconds[b] / seconds[o], 4) for b in lightly_names} for o in ours_names},
        **({"ours_eager_memory_ratio": round(memory["ours_eager"] / memory[headline], 4)}
           if "ours_eager" in memory else {}),
        "first_step_seconds": {contender: round(v, 1) for contender, v in first_step_seconds.items()},
        "baseline": "same backbone + lightly BarlowTwinsProjectionHead + BarlowTwinsLoss + lightly.utils.lars.LARS, fp32, one forward per view",
        "baseline_one_forward": "the same, both views in one forward, model(torch.cat([x1, x2])), as lightly's own benchmark (its BatchNorms mix the views' statistics), fp32",
        "baseline_bf16": "baseline (one forward per view) with forward and loss under CPU autocast to bf16 (as Lightning's bf16-mixed)",
        "baseline_one_forward_bf16": "baseline_one_forward under CPU autocast to bf16",
        "ours_forward": "both views stacked in one forward, each view's BatchNorm statistics its own (issue #32)",
        "runs": args.runs,
        "steps_per_run": args.steps_per_run,
        "warmup_runs": 1,
        "seconds_per_step": {contender: [round(v, 3) for v in values] for contender, values in samples.items()},
        "median_seconds_per_step": {contender: round(s, 3) for contender, s in seconds.items()},
        "images_per_s": {contender: round(v, 3) for contender, v in images.items()},
        "views_per_s": {contender: round(2 * v, 3) for contender, v in images.items()},
        "peak_rss_above_start_bytes": memory,
        "peak_rss_above_start_gib": {contender: round(b / 2**30, 3) for contender, b in memory.items()},
        "memory_method": "own process each; VmHWM above VmRSS after the imports, over building model and optimizer and 2 steps (parameters, gradients, momentum buffers and compilation all count)",
        "first_and_last_loss": {contender: [round(v[0], 3), round(v[-1], 3)] for contender, v in losses.items()},
        "loss_per_step": {contender: [round(v, 4) for v in values] for contender, values in losses.items()},
    }
    if bf16 and "ours_fp32" in seconds:
        details["ours_fp32"] = "ours without autocast (fp32), as in results/train_step_cpu.json"
        details["bf16_over_fp32"] = round(seconds["ours_fp32"] / seconds["ours"], 4)
    if bf16:
        if args.trajectory_steps:
            details["trajectory"] = trajectory(hp, args.batch_size, args.trajectory_steps)
    details["load_average_before"] = [round(v, 2) for v in load_before]
    details["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    details["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_result(
        name,
        ours=images["ours"],
        baseline=images[headline],
        unit="images/s (pairs of views)",
        higher_is_better=True,
        memory_ratio=memory["ours"] / memory[headline] if memory else None,
        target=TARGETS_32[args.mixed_precision],
        details=details,
    )


if __name__ == "__main__":
    main()
