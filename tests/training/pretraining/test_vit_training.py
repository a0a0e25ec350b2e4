"""Training Vision Transformers: the optimiser's weight-decay exclusions, the LARS warning, and
barlow-pretrain's command line with a ViT (its usage errors, and a run that logs RankMe)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.optim import param_groups_weight_decay

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining
from tests.conftest import TINY_RESNET
from tests.training.pretraining_inputs import history
from training.shared.optim import create_optimizer, no_weight_decay_names, split_parameter_groups

TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 4}
REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "benchmarks" / "configs" / "vit_adamw.yaml"


def _tiny_vit(backbone: str = "vit_tiny_patch16_224", **kwargs) -> BarlowTwinsForPreTraining:
    config = BarlowTwinsConfig(backbone=backbone, backbone_kwargs={**TINY_VIT, **kwargs}, image_size=16, projector_dims=[16, 16])
    return BarlowTwinsForPreTraining(config)


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_no_decay_group_is_timms_for_the_backbone(backbone):
    model = _tiny_vit(backbone)
    backbone_module = model.barlow_twins.backbone
    groups = {g["name"]: g for g in split_parameter_groups(model, weight_decay=0.05, lr_weights=1e-3, lr_biases=1e-3)}
    # Independent reference: timm's own optimizer factory's grouping of the bare timm network.
    reference = param_groups_weight_decay(backbone_module, 0.05, no_weight_decay_list=backbone_module.no_weight_decay())
    timm_no_decay = {id(p) for g in reference if g["weight_decay"] == 0 for p in g["params"]}
    timm_decay = {id(p) for g in reference if g["weight_decay"] > 0 for p in g["params"]}
    ours_no_decay = {id(p) for p in groups["biases"]["params"]}
    ours_decay = {id(p) for p in groups["weights"]["params"]}
    backbone_ids = {id(p) for p in backbone_module.parameters()}
    assert ours_no_decay & backbone_ids == timm_no_decay
    assert ours_decay & backbone_ids == timm_decay
    tokens = {id(backbone_module.pos_embed), id(backbone_module.cls_token)}
    assert tokens <= ours_no_decay  # 3-d, so the ndim rule alone would have decayed them
    assert groups["biases"]["weight_decay"] == 0.0 and groups["weights"]["weight_decay"] == 0.05


def test_adamw_leaves_tokens_undecayed():
    model = _tiny_vit()
    optimizer = create_optimizer(model, "adamw", 1e-2, 1e-2, weight_decay=0.5, global_batch_size=256)
    tokens = model.barlow_twins.backbone.pos_embed
    patch_weight = model.barlow_twins.backbone.patch_embed.proj.weight
    before = tokens.detach().clone(), patch_weight.detach().clone()
    for p in model.parameters():  # no gradient anywhere: any change is weight decay
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(tokens.detach(), before[0], rtol=0, atol=0)
    # AdamW's decoupled decay: w <- w (1 - lr wd) for the weights.
    torch.testing.assert_close(patch_weight.detach(), before[1] * (1 - 1e-2 * 0.5))


def test_no_weight_decay_names_are_empty_for_a_resnet():
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=32))
    assert no_weight_decay_names(model) == set()


def test_lars_on_a_vit_warns_and_points_to_the_recipe(caplog):
    with caplog.at_level(logging.WARNING, logger="training.shared.optim"):
        create_optimizer(BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=32)), "lars", 0.2, 0.0048, 1e-6, 256)
        assert not caplog.records
        create_optimizer(_tiny_vit(), "lars", 0.2, 0.0048, 1e-6, 256)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "LARS on a Vision Transformer" in message and "benchmarks/configs/vit_adamw.yaml" in message
    assert RECIPE.is_file()


def _barlow_pretrain(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("barlow-pretrain")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "vit_tiny_patch16_224", "--image_size", "30"], "is not a multiple of the patch size 16"),
        (["--backbone", "vit_tiny_patch16_224", "--image_size", "32", "--small_image_stem"], "ResNet family"),
    ],
)
def test_impossible_vit_options_are_usage_errors(tmp_path, args, message):
    result = _barlow_pretrain(["--output_dir", "run", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def test_vit_recipe_trains_on_the_digits_and_logs_rankme(tmp_path):
    # The first report: a ViT at 32 px ended in a traceback. The recipe's network, made
    # tiny; digits are the default data; RankMe of 64 held-out digits at every logging step.
    result = _barlow_pretrain(
        ["--config", str(RECIPE), "--backbone_kwargs", json.dumps(TINY_VIT), "--image_size", "16",
         "--projector_dims", "32", "32", "--per_device_train_batch_size", "32", "--max_train_steps", "4",
         "--warmup_steps", "1", "--logging_steps", "2", "--rankme_samples", "64", "--output_dir", "run"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    entries = history(out)
    assert [h["step"] for h in entries] == [2, 4]
    for entry in entries:
        assert 1.0 <= entry["rankme"] <= 32 and 1.0 <= entry["rankme_projections"] <= 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rankme"] == entries[-1]["rankme"]
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == config["backbone_kwargs"]["img_size"] == 16
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 16, "width": 16}
    args = json.loads((out / "training_args.json").read_text())
    assert args["optimizer"] == "adamw" and args["weight_decay"] == 0.05
