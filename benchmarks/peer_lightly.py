"""lightly's Barlow Twins, the peer of benchmarks/peer_quality.py: pretraining with checkpoints
that barlow-eval reads, resumable.

lightly as its documentation and its CIFAR-10 benchmark set it up for 32 px images:
``BarlowTwinsProjectionHead(512, 2048, 2048)`` (three layers, 2048 wide), ``BarlowTwinsLoss()``
(lambda 5e-3), ``BYOLTransform`` with ``BYOLView1Transform(input_size=32, gaussian_blur=0.0)`` and
the same for view 2 (ImageNet normalisation), SGD at 0.06 x batch / 128 with momentum 0.9 and
weight decay 5e-4, cosine to 0 over the run (per step here: the run is counted in steps).

On our backbone, for a like-for-like encoder: the timm ResNet-18 with the small-image stem that
``BarlowTwinsModel`` builds, so a checkpoint's encoder is saved as a ``BarlowTwinsModel`` folder
(config, weights, image processor) that barlow-eval evaluates exactly as it evaluates ours.

Fastest CPU setting: channels-last, the forward under bf16 autocast where the CPU has bf16
instructions (the loss in fp32, as ours), and both views in one forward (``joint_views``, as
lightly's ImageNet benchmark; its CIFAR-10 benchmark runs one forward per view).

Ablation (``optimizer="ours"``): the same, with our LARS, parameter groups, warm-up and cosine
schedule and loss scale in place of lightly's SGD, to tell the optimiser's share of a gap.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

RECIPE = {
    "head": "lightly BarlowTwinsProjectionHead(num_features, 2048, 2048)",
    "loss": "lightly BarlowTwinsLoss(lambda_param=5e-3), in fp32",
    "transform": "lightly BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0), "
                 "BYOLView2Transform(input_size=32, gaussian_blur=0.0)), ImageNet normalisation",
    "optimizer": "SGD lr 0.06 x batch / 128, momentum 0.9, weight decay 5e-4, cosine to 0 per step, no warm-up "
                 "(lightly's CIFAR-10 benchmark)",
}
OUR_OPTIMIZER = ("ablation (--lightly_optimizer ours): our LARS, parameter groups, warm-up and cosine schedule and "
                 "loss scale from configs/fmnist_small_image.yaml, in place of lightly's SGD")
OPTIMIZERS = ("sgd", "ours")
OUR_WARMUP_RATIO = 0.1  # our runs' warm-up, a share of the steps (peer_quality's barlow-pretrain --warmup_ratio)
HEAD_DIMS = (2048, 2048)
STATE_FILE = "lightly_training_state.pt"


def encoder_config(backbone_kwargs: dict, image_size: int = 32, projector_dims: list[int] | None = None):
    """The encoder both sides train: timm ResNet-18 with the small-image stem, normalised as
    lightly's transforms do (``projector_dims``: ours', where our model is built from it)."""
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    from modeling_barlow import BarlowTwinsConfig

    return BarlowTwinsConfig(backbone="resnet18", backbone_kwargs=backbone_kwargs, small_image_stem=True,
                             image_size=image_size, image_mean=IMAGENET_NORMALIZE["mean"],
                             image_std=IMAGENET_NORMALIZE["std"], **({"projector_dims": projector_dims} if projector_dims else {}))


class LightlyBarlowTwins(nn.Module):
    """Our encoder's backbone followed by lightly's projection head."""

    def __init__(self, config) -> None:
        from lightly.models.modules import BarlowTwinsProjectionHead

        from modeling_barlow import BarlowTwinsModel

        super().__init__()
        self.encoder = BarlowTwinsModel(config)
        self.head = BarlowTwinsProjectionHead(self.encoder.backbone.num_features, *HEAD_DIMS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.backbone(x))


def recipe(optimizer: str = "sgd") -> dict:
    """What lightly's side runs, in words: :data:`RECIPE`, its optimiser replaced for the ablation."""
    return RECIPE if optimizer == "sgd" else {**RECIPE, "optimizer": OUR_OPTIMIZER}


def _our_optimizer(model: nn.Module, batch_size: int, total_steps: int):
    """(optimizer, scheduler, loss scale) of our recipe, for the ablation ``optimizer="ours"``: LARS
    over our two parameter groups with configs/fmnist_small_image.yaml's settings, warm-up of a tenth
    of the steps then cosine, as barlow-pretrain builds them in peer_quality's "ours" runs."""
    import math

    import yaml
    from fashion_mnist import SMALL_IMAGE_CONFIG

    from training.shared.optim import create_optimizer, create_scheduler

    settings = yaml.safe_load(SMALL_IMAGE_CONFIG.read_text())
    optimizer = create_optimizer(model, "lars", settings["learning_rate_weights"], settings["learning_rate_biases"],
                                 settings["weight_decay"], batch_size)
    scheduler = create_scheduler(optimizer, total_steps, math.ceil(OUR_WARMUP_RATIO * total_steps))
    return optimizer, scheduler, settings["loss_scale"]


def build(config, batch_size: int, total_steps: int, bf16: bool, joint_views: bool = True, seed: int = 0,
          optimizer: str = "sgd"):
    """(model, optimizer, scheduler, step): ``step(x1, x2)`` is one training step, returning the loss.

    ``optimizer``: ``"sgd"``, lightly's recipe; ``"ours"``, an ablation that swaps in our optimiser,
    schedule and loss scale (:func:`_our_optimizer`) and keeps everything else lightly's."""
    from lightly.loss import BarlowTwinsLoss

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    torch.manual_seed(seed)
    model = LightlyBarlowTwins(config).train().to(memory_format=torch.channels_last)
    criterion = BarlowTwinsLoss(lambda_param=5e-3)
    if optimizer == "sgd":
        sgd = torch.optim.SGD(model.parameters(), lr=0.06 * batch_size / 128, momentum=0.9, weight_decay=5e-4)
        optim, scheduler, loss_scale = sgd, torch.optim.lr_scheduler.CosineAnnealingLR(sgd, total_steps), 1.0
    else:
        optim, scheduler, loss_scale = _our_optimizer(model, batch_size, total_steps)

    def step(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z1, z2 = model(torch.cat([x1, x2])).chunk(2) if joint_views else (model(x1), model(x2))
        loss = criterion(z1.float(), z2.float())
        (loss_scale * loss).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        scheduler.step()
        return loss.detach()

    return model, optim, scheduler, step


class _Pairs(torch.utils.data.Dataset):
    """Fashion-MNIST images (uint8, N x 28 x 28) as RGB PIL images through lightly's two-view transform."""

    def __init__(self, images: np.ndarray) -> None:
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

        self.images = images
        self.transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                                       view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index]).convert("RGB"))


class _StepBatches(torch.utils.data.Sampler):
    """The batches of steps ``start`` to ``total``: epoch ``e`` is a permutation seeded by (seed, e),
    cut into full batches, so a resumed run reads the batches an uninterrupted run would."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, total: int) -> None:
        self.size, self.batch_size, self.seed, self.start, self.total = size, batch_size, seed, start, total
        self.per_epoch = size // batch_size

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        order, epoch = None, None
        for step in range(self.start, self.total):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            offset = (step % self.per_epoch) * self.batch_size
            yield order[offset: offset + self.batch_size].tolist()


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in ``run_dir``, by step."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        if path.name.split("-")[-1].isdigit() and (path / STATE_FILE).is_file():
            found.append((int(path.name.split("-")[-1]), path))
    return sorted(found)


def _save(run_dir: Path, step: int, max_steps: int, optimizer_name: str, model, optimizer, scheduler,
          wall_time_s: float) -> Path:
    """checkpoint-<step>: the encoder as barlow-eval reads it, and the training state to resume; atomic."""
    from modeling_barlow import create_image_processor

    final, partial = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.encoder.save_pretrained(partial)
    create_image_processor(model.encoder.config).save_pretrained(partial)
    torch.save({"step": step, "max_steps": max_steps, "optimizer_name": optimizer_name, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "wall_time_s": wall_time_s},
               partial / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def pretrain(run_dir: Path, images: np.ndarray, *, seed: int, batch_size: int, max_steps: int,
             checkpointing_steps: int, bf16: bool, joint_views: bool, backbone_kwargs: dict,
             resume: bool, num_workers: int = 1, logging_steps: int = 20, optimizer_name: str = "sgd") -> dict:
    """Train to ``max_steps``, a checkpoint every ``checkpointing_steps`` and at the end; with
    ``resume``, from the newest checkpoint in ``run_dir``. Appends to log_history.jsonl; returns
    the final metrics (also written to metrics.json). ``optimizer_name``: see :func:`build`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = encoder_config(backbone_kwargs, projector_dims=[HEAD_DIMS[0], *HEAD_DIMS])  # the head's widths
    model, optimizer, scheduler, step_fn = build(config, batch_size, max_steps, bf16, joint_views, seed,
                                                 optimizer_name)
    start, wall_before = 0, 0.0
    if resume and checkpoints(run_dir):
        state = torch.load(checkpoints(run_dir)[-1][1] / STATE_FILE, weights_only=True)
        if state.get("max_steps") != max_steps:  # the cosine schedule's length is in the checkpoint
            raise ValueError(f"{run_dir} was started for {state.get('max_steps')} steps, not {max_steps}: resume "
                             f"with the same --max_steps.")
        if state.get("optimizer_name", "sgd") != optimizer_name:  # checkpoints older than the option are "sgd"
            raise ValueError(f"{run_dir} was trained with --lightly_optimizer {state.get('optimizer_name', 'sgd')}, "
                             f"not {optimizer_name}: resume with the same, or use another --work_dir.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, wall_before = state["step"], state["wall_time_s"]
        logger.info(f"Resumed from step {start} of {max_steps}.")
    elif checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} holds checkpoints: pass --resume_from_checkpoint latest, or another folder.")
    # The augmentations' draws depend on where the run (re)starts; the batches' images do not.
    loader = torch.utils.data.DataLoader(
        _Pairs(images), batch_sampler=_StepBatches(len(images), batch_size, seed, start, max_steps),
        num_workers=num_workers, generator=torch.Generator().manual_seed(seed * 100_003 + start),
    )
    started, window_start, losses = time.perf_counter(), time.perf_counter(), []
    with open(run_dir / "log_history.jsonl", "a") as log:
        for step, (x1, x2) in enumerate(loader, start=start + 1):
            losses.append(float(step_fn(x1, x2)))
            wall = wall_before + time.perf_counter() - started
            if step % logging_steps == 0 or step == max_steps:
                rate = batch_size * len(losses) / (time.perf_counter() - window_start)
                entry = {"step": step, "loss": round(float(np.mean(losses)), 4), "lr": scheduler.get_last_lr()[0],
                         "images_per_second": round(rate, 2), "wall_time_s": round(wall, 2)}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                print(json.dumps(entry), flush=True)
                window_start, losses = time.perf_counter(), []
            if step % checkpointing_steps == 0 or step == max_steps:
                _save(run_dir, step, max_steps, optimizer_name, model, optimizer, scheduler, round(wall, 2))
    metrics = {"global_step": max_steps, "wall_time_s": round(wall_before + time.perf_counter() - started, 2),
               "bf16": bf16, "joint_views": joint_views, "recipe": recipe(optimizer_name), "seed": seed,
               "batch_size": batch_size, "num_train_examples": len(images), "pid": os.getpid()}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
