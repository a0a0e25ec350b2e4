"""Helpers shared by the hub tests: a tiny model, a populated hub cache, an isolated interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining


TINY = {
    "backbone": "resnet18",
    "backbone_kwargs": {"channels": [8, 16, 16, 32]},
    "projector_dims": [16, 16],
    "image_size": 32,
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOCKED = ("modeling_barlow", "training", "hub")


def tiny_model(**overrides) -> BarlowTwinsForPreTraining:
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**{**TINY, **overrides})).eval()
    # Non-trivial BatchNorm statistics, so a loader that drops the buffers cannot pass.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model


def populate_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as hf_hub_download leaves a downloaded repo: models--owner--name/
    snapshots/<commit>/... and refs/main, so HF_HUB_OFFLINE=1 loads resolve `repo_id` from it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def run_isolated(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter where modeling_barlow, training and hub cannot be
    imported, offline, with the hub cache and remote-code modules under tmp_path."""
    prelude = f"import sys\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None\n"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(tmp_path / "hub_cache"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed
