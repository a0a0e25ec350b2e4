"""GPU training step: our fast path against the authors' setting, ResNet-50 at 224 px (issue #8, part 5).

    python benchmarks/gpu_step.py                       # on a CUDA machine; writes results/gpu_step.json
    python benchmarks/gpu_step.py --e2e_data DIR        # also barlow-pretrain end to end from parquet
    python benchmarks/gpu_step.py --smoke --device cpu  # plumbing check on a tiny network, writes nothing

Both contenders train the same network (timm ResNet-50, projector 8192-8192-8192, per-device
batch 256 images = 512 views) on the same synthetic tensors:

* baseline, as the authors ran it: eager, fp16 autocast with a GradScaler, NCHW, their loss
  (C = bn(z1)^T bn(z2) / N formed in half precision) and their LARS (a Python loop over parameters).
* ours: BarlowTwinsForPreTraining under bf16 autocast, channels_last, our loss (fp32, the Gram
  form when N < D), timm's multi-tensor LARS from training.shared.optim; with --compile also torch.compile.

Timing alternates the contenders (common.alternate) and reports medians. Peak memory is each
contender's own (allocated above what was there before it was built). MFU is the model's FLOPs
per image (two views, forward and backward, counted by torch's FlopCounterMode) times images/s,
over the card's peak dense bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, alternate, make_photo_parquet, median, timed, write_result  # noqa: E402

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining  # noqa: E402
from training.shared.optim import create_optimizer  # noqa: E402

# Peak dense bf16 tensor-core rates (vendor datasheets, SXM parts, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


# ------------------------------------------------------------------------------ the authors' side
class AuthorsLARS(torch.optim.Optimizer):
    """The release's LARS: a Python loop, per-parameter norms, 1-d parameters filtered out."""

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


class AuthorsBarlowTwins(nn.Module):
    """The release's module around our backbone and projector: loss on C formed under autocast."""

    def __init__(self, model: BarlowTwinsForPreTraining):
        super().__init__()
        self.backbone = model.barlow_twins
        self.projector = model.projector
        self.bn = nn.BatchNorm1d(model.config.projector_dims[-1], affine=False)
        self.lambd = model.config.off_diagonal_weight

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1).pooler_output)
        z2 = self.projector(self.backbone(y2).pooler_output)
        c = self.bn(z1).T @ self.bn(z2)
        c.div_(y1.shape[0])
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + self.lambd * off_diag


# ------------------------------------------------------------------------------------ contenders
def build_config(args) -> BarlowTwinsConfig:
    return BarlowTwinsConfig(
        backbone=args.backbone, projector_dims=list(args.projector_dims),
        image_size=args.image_size, backbone_kwargs=json.loads(args.backbone_kwargs),
    )


def param_groups_lrs(batch: int) -> tuple[float, float]:
    return 0.2 * batch / 256, 0.0048 * batch / 256


class Contender:
    """One side: its model, optimizer and one training step on fixed input tensors."""

    def __init__(self, name: str, args, views: tuple[torch.Tensor, torch.Tensor]):
        self.name, self.device = name, torch.device(args.device)
        before = self._allocated()
        model = BarlowTwinsForPreTraining(build_config(args)).to(self.device)
        lr_w, lr_b = param_groups_lrs(args.batch_size)
        if name == "baseline":
            self.module = AuthorsBarlowTwins(model).to(self.device)
            weights = [p for p in self.module.parameters() if p.ndim != 1]
            biases = [p for p in self.module.parameters() if p.ndim == 1]
            self.optimizer = AuthorsLARS([{"params": weights, "lr": lr_w}, {"params": biases, "lr": lr_b}], lr=lr_w, weight_decay=1.5e-6)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.device.type == "cuda")
            self.dtype, self.views = (torch.float16 if self.device.type == "cuda" else torch.bfloat16), views
        else:
            model.to(memory_format=torch.channels_last)
            self.module = torch.compile(model) if name == "ours_compiled" else model
            self.optimizer = create_optimizer(model, "lars", 0.2, 0.0048, 1.5e-6, args.batch_size)
            self.scaler, self.dtype = None, torch.bfloat16
            self.views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
        self.module.train()
        self.static_bytes = self._allocated() - before

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.device.type == "cuda" else 0

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype):
            if self.scaler is not None:
                loss = self.module(*self.views)
            else:
                loss = self.module(pixel_values=self.views[0], pixel_values_2=self.views[1]).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def peak_bytes(self, steps: int) -> int:
        """Peak allocated during `steps` steps, above what was allocated before this side was built."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            self.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base + self.static_bytes


def flops_per_image(args, views) -> float:
    """Forward and backward FLOPs of our model for one image (both views), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = BarlowTwinsForPreTraining(build_config(args)).to(args.device)
    small = tuple(v[:8] for v in views)
    counter = FlopCounterMode(display=False)
    with counter:
        model(pixel_values=small[0], pixel_values_2=small[1]).loss.backward()
    del model
    return counter.get_total_flops() / 8


def peak_flops(device_name: str) -> float | None:
    return next((rate for key, rate in PEAK_BF16_FLOPS.items() if key in device_name), None)


# ------------------------------------------------------------------------------------ end to end
def end_to_end(args) -> dict:
    """barlow-pretrain from a parquet folder with --augment_on_device: its logged images/s."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_step_e2e_"))
    command = [
        sys.executable, "-m", "training.pretrain", "--dataset_name", str(args.e2e_data), "--output_dir", str(run_dir),
        "--backbone", args.backbone, "--backbone_kwargs", args.backbone_kwargs, "--image_size", str(args.image_size), "--projector_dims", *map(str, args.projector_dims),
        "--per_device_train_batch_size", str(args.batch_size), "--max_train_steps", str(args.e2e_steps),
        "--warmup_steps", "5", "--logging_steps", "10", "--mixed_precision", "bf16", "--channels_last",
        "--augment_on_device", "--dataloader_num_workers", str(args.e2e_workers), "--shuffle_buffer_size", "1000",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr[-3000:], "command": " ".join(command)}
    history = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    windows = history[1:] or history  # the first window holds start-up and cuDNN autotuning
    return {
        "images_per_second": median([h["images_per_second"] for h in windows]),
        "data_wait_fraction": median([h["data_wait_fraction"] for h in windows]),
        "windows": [round(h["images_per_second"], 1) for h in history],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "command": " ".join(command[1:]),
    }


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--backbone_kwargs", default="{}")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--projector_dims", type=int, nargs="+", default=[8192, 8192, 8192])
    parser.add_argument("--batch_size", type=int, default=256, help="images per step (each gives two views)")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--e2e_data", type=Path,
                        help="a parquet image folder for the end-to-end barlow-pretrain run (made from scikit-learn's "
                             "sample photos with --e2e_images if it does not exist)")
    parser.add_argument("--e2e_images", type=int, default=12_288, help="photos to cut when --e2e_data must be made")
    parser.add_argument("--e2e_steps", type=int, default=40)
    parser.add_argument("--e2e_workers", type=int, default=14)
    parser.add_argument("--out_dir", type=Path, default=None, help="where to write (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny network and batch: checks the plumbing")
    args = parser.parse_args()
    if args.smoke:
        args.backbone_kwargs, args.image_size, args.projector_dims = '{"channels": [8, 16, 16, 32]}', 32, [64, 64]
        args.backbone, args.batch_size, args.steps, args.runs, args.e2e_steps = "resnet18", 8, 2, 2, 4
    if args.e2e_data:  # before CUDA starts: the photos are cut in worker processes
        # One shard per loader worker: datasets gives each worker whole shards, so fewer shards idle workers.
        make_photo_parquet(args.e2e_data, args.e2e_images, shards=args.e2e_workers, processes=args.e2e_workers)
    torch.backends.cudnn.benchmark = True
    on_cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else None

    generator = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = tuple(torch.randn(shape, device=args.device, generator=generator) for _ in range(2))
    names = ["baseline", "ours"] + (["ours_compiled"] if args.compile else [])

    contenders, memory, compile_s = {}, {}, None
    for name in names:  # built one after the other, so each peak is its own
        started = time.perf_counter()
        contenders[name] = Contender(name, args, views)
        contenders[name].step()  # warm-up (and compilation)
        if sync:
            sync()
        if name == "ours_compiled":
            compile_s = round(time.perf_counter() - started, 1)
        memory[name] = contenders[name].peak_bytes(2)
        print(f"{name}: built and warmed in {time.perf_counter() - started:.1f} s, peak {memory[name] / 2**30:.2f} GiB", flush=True)

    def run(contender):
        return lambda: timed(lambda: [contender.step() for _ in range(args.steps)], sync) / args.steps

    samples = alternate({name: run(c) for name, c in contenders.items()}, runs=args.runs, warmup=1)
    images_per_s = {name: args.batch_size / median(s) for name, s in samples.items()}
    flops = flops_per_image(args, views)
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    peak = peak_flops(device_name)
    best = max((n for n in names if n != "baseline"), key=images_per_s.get)

    details = {
        "setting": f"{args.backbone} at {args.image_size} px, projector {'-'.join(map(str, args.projector_dims))}, batch {args.batch_size} "
                   f"images ({2 * args.batch_size} views) per step, synthetic tensors on the device",
        "card": device_name,
        "peak_dense_bf16_flops": peak,
        "flops_per_image_fwd_bwd": flops,
        "step_seconds": {n: [round(x, 5) for x in s] for n, s in samples.items()},
        "per_contender": {
            n: {
                "images_per_s": round(images_per_s[n], 1),
                "views_per_s": round(2 * images_per_s[n], 1),
                "peak_memory_gib": round(memory[n] / 2**30, 3),
                "mfu": round(flops * images_per_s[n] / peak, 4) if peak else None,
            }
            for n in names
        },
        "ours_reported": best,
        "compile_warmup_s": compile_s,
        "targets": "ratio >= 1.5; >= 3500 views/s per H100; end to end >= 0.9 of the step throughput",
    }
    out_dir = args.out_dir or (Path("/tmp/gpu_step_smoke") if args.smoke else REPO_ROOT / "benchmarks" / "results")

    def write() -> None:
        write_result(
            "gpu_step", ours=round(images_per_s[best], 1), baseline=round(images_per_s["baseline"], 1), unit="images/s",
            higher_is_better=True, memory_ratio=memory[best] / memory["baseline"] if memory["baseline"] else None,
            target="ratio >= 1.5 and >= 1750 images/s (3500 views/s) per H100", details=details, results_dir=out_dir,
        )

    write()  # the step comparison is kept even if the end-to-end run is cut short
    if args.e2e_data:
        del contenders  # the end-to-end run needs the memory
        if on_cuda:
            torch.cuda.empty_cache()
        e2e = end_to_end(args)
        if "images_per_second" in e2e:
            e2e["share_of_step_throughput"] = round(e2e["images_per_second"] / images_per_s["ours"], 4)
        details["end_to_end"] = e2e
        write()


if __name__ == "__main__":
    main()
