"""benchmarks/peer_lightly.py: lightly's side of the peer comparison saves checkpoints that barlow-eval
reads (our encoder classes, holding exactly the weights lightly trained) and resumes from them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
peer_lightly = pytest.importorskip("peer_lightly")
pytest.importorskip("lightly")

from modeling_barlow import BarlowTwinsModel  # noqa: E402

TINY = {"channels": [8, 16, 16, 32]}


def _train(run_dir: Path, images: np.ndarray, max_steps: int, resume: bool = False,
           optimizer_name: str = "sgd") -> dict:
    return peer_lightly.pretrain(run_dir, images, seed=0, batch_size=16, max_steps=max_steps, checkpointing_steps=1,
                                 bf16=False, joint_views=True, backbone_kwargs=TINY, resume=resume, num_workers=0,
                                 logging_steps=1, optimizer_name=optimizer_name)


def test_checkpoints_hold_the_trained_encoder_and_resume(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(48, 28, 28), dtype=np.uint8)
    run = tmp_path / "run"
    _train(run, images, max_steps=5)
    assert [step for step, _ in peer_lightly.checkpoints(run)] == [1, 2, 3, 4, 5]
    for step, folder in peer_lightly.checkpoints(run):
        trained = torch.load(folder / peer_lightly.STATE_FILE, weights_only=True)["model"]
        exported = BarlowTwinsModel.from_pretrained(folder).state_dict()
        assert exported.keys() == {k.removeprefix("encoder.") for k in trained if k.startswith("encoder.")}
        assert all(torch.equal(exported[k], trained[f"encoder.{k}"].to(exported[k].dtype)) for k in exported), step
    first, last = (BarlowTwinsModel.from_pretrained(run / f"checkpoint-{s}").state_dict() for s in (1, 5))
    assert not torch.equal(first["backbone.conv1.weight"], last["backbone.conv1.weight"])  # it trained

    # As if the run had stopped after step 3: a folder with checkpoints is refused unless resumed, a
    # resume with another length is refused (the schedule's length is saved), and a resume continues from step 3.
    for step in (4, 5):
        shutil.rmtree(run / f"checkpoint-{step}")
    (run / "metrics.json").unlink()
    with pytest.raises(FileExistsError):
        _train(run, images, max_steps=5)
    with pytest.raises(ValueError, match="started for 5 steps, not 6"):
        _train(run, images, max_steps=6, resume=True)
    _train(run, images, max_steps=5, resume=True)
    assert [step for step, _ in peer_lightly.checkpoints(run)] == [1, 2, 3, 4, 5]
    steps = [json.loads(line)["step"] for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 4, 5]  # the log is appended to; the resumed part starts after step 3
    # Step 4 continued from step 3's weights, not from a fresh start (which is step 0's, then close to step 1's).
    weights = {s: torch.cat([v.flatten().float() for k, v in BarlowTwinsModel.from_pretrained(run / f"checkpoint-{s}")
                             .state_dict().items() if k.endswith("weight")]) for s in (1, 3, 4)}
    assert (weights[4] - weights[3]).norm() < (weights[4] - weights[1]).norm()


def test_the_optimiser_ablation_is_our_recipe_and_is_not_mixed_on_resume(tmp_path):
    """--lightly_optimizer ours: LARS with configs/fmnist_small_image.yaml's rates scaled by batch / 256
    (weights 6.0, biases 0.3; weight decay 1e-4 on weights only), a warm-up of a tenth of the steps, the
    loss scaled by 0.1; lightly's SGD otherwise. A run is resumed only with the optimiser it started with."""
    from timm.optim import Lars

    config = peer_lightly.encoder_config(TINY, projector_dims=[2048, 2048, 2048])
    model, optimizer, scheduler, _ = peer_lightly.build(config, batch_size=64, total_steps=100, bf16=False,
                                                        optimizer="ours")
    assert isinstance(optimizer, Lars)
    weights, biases = optimizer.param_groups
    assert (weights["peak_lr"], biases["peak_lr"]) == pytest.approx((6.0 * 64 / 256, 0.3 * 64 / 256))
    assert (weights["weight_decay"], biases["weight_decay"]) == (1e-4, 0.0)
    assert {id(p) for p in weights["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert weights["lr"] == 0.0  # the warm-up starts at 0 and reaches the peak at step 10
    for _ in range(10):
        scheduler.step()
    assert weights["lr"] == pytest.approx(6.0 * 64 / 256)
    _, sgd, _, _ = peer_lightly.build(config, batch_size=64, total_steps=100, bf16=False)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["lr"] == pytest.approx(0.06 * 64 / 128)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        peer_lightly.build(config, batch_size=64, total_steps=100, bf16=False, optimizer="adam")

    images = np.random.default_rng(0).integers(0, 256, size=(32, 28, 28), dtype=np.uint8)
    run = tmp_path / "run"
    metrics = _train(run, images, max_steps=2, optimizer_name="ours")
    assert "ablation" in metrics["recipe"]["optimizer"]
    shutil.rmtree(run / "checkpoint-2")
    (run / "metrics.json").unlink()
    with pytest.raises(ValueError, match="trained with --lightly_optimizer ours, not sgd"):
        _train(run, images, max_steps=2, resume=True)
    _train(run, images, max_steps=2, resume=True, optimizer_name="ours")
    assert [step for step, _ in peer_lightly.checkpoints(run)] == [1, 2]
