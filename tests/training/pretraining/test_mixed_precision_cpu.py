"""bf16 on a CPU: `barlow-pretrain --mixed_precision bf16` runs the network under CPU autocast (what
accelerate does there), computes the loss in fp32 and keeps fp32 weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining
from tests.conftest import TINY_RESNET
from tests.training.pretraining_inputs import TINY, history


def test_under_cpu_autocast_the_network_runs_in_bf16_and_the_loss_in_fp32():
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=32)).train()
    views = torch.randn(2, 8, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(views[0], views[1])
    assert out.projections.dtype == torch.bfloat16  # the projector's matmuls ran in bf16
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_installed_script_trains_in_bf16_on_the_cpu(tmp_path, parquet_folder):
    script = Path(sys.executable).with_name("barlow-pretrain")  # the console script pip installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        result = subprocess.run(
            [str(script), "--dataset_name", str(parquet_folder), "--output_dir", str(out), "--max_train_steps", "3",
             *TINY, "--mixed_precision", precision],
            capture_output=True, text=True, timeout=600, env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        losses[precision] = [h["train_loss"] for h in history(out)]
        weights = load_file(out / "model.safetensors")
        assert {t.dtype for name, t in weights.items() if "num_batches_tracked" not in name} == {torch.float32}
    # Same seed, weights and images: bf16 shows as rounding, small but never zero (0.003% to 0.44%
    # measured).
    assert len(losses["bf16"]) == len(losses["no"]) == 3
    for bf16, fp32 in zip(losses["bf16"], losses["no"]):
        assert bf16 != fp32
        assert bf16 == pytest.approx(fp32, rel=0.02)
