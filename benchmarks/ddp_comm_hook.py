"""What `--ddp_comm_hook bf16` does to the loss: two gloo processes, fp32 against bf16 gradients.

    python benchmarks/ddp_comm_hook.py [--steps 40]

Runs ``barlow-pretrain`` twice under ``torchrun --nproc_per_node 2`` (one thread each), identical
but for ``--ddp_comm_hook``: a small network (ResNet-18 narrowed to 16-32-64-128 channels, small-image
stem, 32 px, projector 512-512-512) on scikit-learn's digits, batch 32 per process, ``--steps`` LARS
steps with the default optimiser settings and seed. Both runs start from the same weights and see
the same images and augmentations, so step 1 is identical and every later difference comes from
the rounding of the exchanged gradients to bf16.

``ours`` and ``baseline`` are the mean loss of the last 10 steps with bf16 and fp32 gradients
(``ratio`` near 1: the same training); ``details`` has both trajectories and their relative
differences step by step. Speed is not the point here (two processes on one machine exchange
gradients through memory); the bytes each process sends per step are counted from the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO_ROOT, median, write_result  # noqa: E402


NAME = "ddp_comm_hook"
NETWORK = ["--backbone", "resnet18", "--backbone_kwargs", '{"channels": [16, 32, 64, 128]}', "--small_image_stem",
           "--image_size", "32", "--projector_dims", "512", "512", "512"]
LAST = 10


def pretrain(output_dir: Path, steps: int, batch_size: int, comm_hook: str) -> list[dict]:
    """One two-process run of barlow-pretrain; its log history."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training.pretrain",
               *NETWORK, "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--warmup_steps", "5",
               "--per_device_train_batch_size", str(batch_size), "--logging_steps", "1", "--seed", "0",
               "--ddp_comm_hook", comm_hook]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"barlow-pretrain --ddp_comm_hook {comm_hook} failed:\n{result.stderr[-4000:]}")
    return [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]


def _parameters(output_dir: Path) -> int:
    """Trainable parameters of the saved model (BatchNorm's running statistics left out)."""
    import math

    from safetensors import safe_open

    with safe_open(str(output_dir / "model.safetensors"), "pt") as tensors:
        return sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys()
                   if "running_" not in key and "num_batches_tracked" not in key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps of each run.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per process per step.")
    args = parser.parse_args()
    if args.steps <= LAST:
        parser.error(f"--steps must be more than {LAST}")

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        histories = {hook: pretrain(Path(tmp) / hook, args.steps, args.batch_size, hook) for hook in ("no", "bf16")}
        parameters = _parameters(Path(tmp) / "no")
    loss = {hook: [h["train_loss"] for h in history] for hook, history in histories.items()}
    relative = [abs(b - f) / abs(f) for b, f in zip(loss["bf16"], loss["no"])]
    last = {hook: sum(values[-LAST:]) / LAST for hook, values in loss.items()}
    details = {
        "network": " ".join(NETWORK),
        "data": "scikit-learn digits (barlow-pretrain's default), two processes x batch "
                f"{args.batch_size}, one thread each, gloo",
        "steps": args.steps,
        "step_1_identical": loss["bf16"][0] == loss["no"][0],
        "max_relative_difference": round(max(relative), 5),
        "mean_relative_difference": round(sum(relative) / len(relative), 5),
        f"relative_difference_of_last_{LAST}_step_mean": round(abs(last["bf16"] - last["no"]) / last["no"], 5),
        "loss_fp32_gradients": [round(v, 4) for v in loss["no"]],
        "loss_bf16_gradients": [round(v, 4) for v in loss["bf16"]],
        "relative_difference_per_step": [round(v, 5) for v in relative],
        "parameters": parameters,
        "gradient_bytes_sent_per_step": {"fp32": 4 * parameters, "bf16": 2 * parameters},
        "median_images_per_second": {hook: round(median([h["images_per_second"] for h in history[1:]]), 2)
                                     for hook, history in histories.items()},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_result(NAME, ours=last["bf16"], baseline=last["no"], unit=f"train_loss, mean of the last {LAST} steps",
                 higher_is_better=False, details=details)


if __name__ == "__main__":
    main()
