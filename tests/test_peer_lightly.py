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


def _train(run_dir: Path, images: np.ndarray, max_steps: int, resume: bool = False) -> dict:
    return peer_lightly.pretrain(run_dir, images, seed=0, batch_size=16, max_steps=max_steps, checkpointing_steps=1,
                                 bf16=False, joint_views=True, backbone_kwargs=TINY, resume=resume, num_workers=0,
                                 logging_steps=1)


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
