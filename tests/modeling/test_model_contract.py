"""What transformers expects of a model, each checked against an independent reference:
hidden states (transformers' ResNet with the same weights; ViT blocks read directly), the loss for
each `problem_type` (transformers' own loss function), missing weights initialised as timm does (a
freshly created timm network), gradient checkpointing (gradients without it), per-channel
statistics given as one number (a direct computation)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ResNetConfig, ResNetModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
    create_image_processor,
)

from ..conftest import TINY_RESNET


TINY_VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3},
            "projector_dims": [32, 32], "image_size": 32}
TINY_CONVNEXT = {"backbone": "convnext_atto", "backbone_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
                 "projector_dims": [32, 32], "image_size": 32}


# ------------------------------------------------------------------------------------ hidden states
def _transformers_resnet_with_weights_of(network: nn.Module) -> ResNetModel:
    """transformers' ResNetModel for timm's resnet18 with narrowed stages, holding the same weights."""
    config = ResNetConfig(embedding_size=64, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="basic")
    reference = ResNetModel(config).eval()
    timm_state = network.state_dict()
    state = {}

    def copy_conv_bn(hf_prefix: str, conv: str, bn: str) -> None:
        state[f"{hf_prefix}.convolution.weight"] = timm_state[f"{conv}.weight"]
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            state[f"{hf_prefix}.normalization.{name}"] = timm_state[f"{bn}.{name}"]

    copy_conv_bn("embedder.embedder", "conv1", "bn1")
    for stage in range(4):
        for block in range(2):
            hf, tm = f"encoder.stages.{stage}.layers.{block}", f"layer{stage + 1}.{block}"
            copy_conv_bn(f"{hf}.layer.0", f"{tm}.conv1", f"{tm}.bn1")
            copy_conv_bn(f"{hf}.layer.1", f"{tm}.conv2", f"{tm}.bn2")
            if f"{tm}.downsample.0.weight" in timm_state:
                copy_conv_bn(f"{hf}.shortcut", f"{tm}.downsample.0", f"{tm}.downsample.1")
    reference.load_state_dict(state, strict=True)
    return reference


def _randomise_batchnorms(model: nn.Module) -> None:
    # zero_init_residual zeroes the last BatchNorm of every block, which would hide a wrong block.
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.5
            module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.1
            module.running_mean = torch.randn(module.running_mean.shape, generator=generator) * 0.1
            module.running_var = torch.rand(module.running_var.shape, generator=generator) + 0.5


def test_hidden_states_are_those_of_transformers_resnet():
    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET)).eval()
    _randomise_batchnorms(model)
    reference = _transformers_resnet_with_weights_of(model.backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x, output_hidden_states=True)
        theirs = reference(x, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 5
    # The stem: timm's intermediate is taken before the stem's max-pool, transformers' after it.
    stem_pooled = nn.functional.max_pool2d(ours.hidden_states[0], kernel_size=3, stride=2, padding=1)
    torch.testing.assert_close(stem_pooled, theirs.hidden_states[0])
    for got, expected in zip(ours.hidden_states[1:], theirs.hidden_states[1:]):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output.flatten(1))


def test_hidden_states_follow_the_config_and_return_dict():
    config = BarlowTwinsConfig(**TINY_RESNET, output_hidden_states=True, num_labels=3)
    x = torch.randn(2, 3, 32, 32)
    encoder = BarlowTwinsModel(config).eval()
    assert len(encoder(x).hidden_states) == 5
    assert encoder(x, output_hidden_states=False).hidden_states is None
    as_tuple = encoder(x, return_dict=False)
    assert len(as_tuple) == 3 and len(as_tuple[2]) == 5
    classifier = BarlowTwinsForImageClassification(config).eval()
    assert [h.shape[1] for h in classifier(x).hidden_states] == [64, 16, 32, 64, 128]
    pretraining = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET)).eval()
    assert pretraining(x).hidden_states is None
    assert len(pretraining(x, output_hidden_states=True).hidden_states) == 5


def test_vit_hidden_states_are_each_blocks_patch_tokens_as_maps():
    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY_VIT)).eval()
    vit = model.backbone
    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o)) for block in vit.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    assert len(out.hidden_states) == 3
    for tokens, got in zip(captured, out.hidden_states):
        patches = tokens[:, vit.num_prefix_tokens:]  # drop the class token
        expected = patches.reshape(2, 4, 4, 192).permute(0, 3, 1, 2)  # 32 px / patch 8 = 4 x 4
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out.last_hidden_state, vit.forward_features(x))


# ------------------------------------------------------------------------------------- problem type
# (problem_type or None to infer it, num_labels, labels, the problem type transformers uses)
PROBLEMS = {
    "regression, one output": ("regression", 1, lambda: torch.randn(4), "regression"),
    "regression, one output, inferred": (None, 1, lambda: torch.randn(4), "regression"),
    "regression, three outputs": ("regression", 3, lambda: torch.randn(4, 3), "regression"),
    "single label": ("single_label_classification", 3, lambda: torch.tensor([0, 2, 1, 2]), "single_label_classification"),
    "single label, inferred": (None, 3, lambda: torch.tensor([0, 2, 1, 2]), "single_label_classification"),
    "single label, ignored index": ("single_label_classification", 3, lambda: torch.tensor([0, -100, 1, 2]),
                                    "single_label_classification"),
    "multi label": ("multi_label_classification", 3, lambda: torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]]),
                    "multi_label_classification"),
    "multi label, inferred": (None, 3, lambda: torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]]),
                              "multi_label_classification"),
}


@pytest.mark.parametrize("case", list(PROBLEMS))
def test_loss_is_transformers_loss_for_each_problem_type(case):
    problem_type, num_labels, make_labels, expected_type = PROBLEMS[case]
    labels = make_labels()
    config = BarlowTwinsConfig(**TINY_RESNET, num_labels=num_labels, problem_type=problem_type)
    model = BarlowTwinsForImageClassification(config).eval()
    out = model(torch.randn(4, 3, 32, 32), labels=labels)

    reference_config = BarlowTwinsConfig(**TINY_RESNET, num_labels=num_labels, problem_type=problem_type)
    expected = ForSequenceClassificationLoss(labels, out.logits.detach(), reference_config)
    torch.testing.assert_close(out.loss.detach(), expected)
    # Inferred types are recorded in the config, as transformers records them.
    assert model.config.problem_type == reference_config.problem_type == expected_type
    if expected_type == "multi_label_classification":  # the case that used to be softmax cross-entropy
        p = torch.sigmoid(out.logits.detach())
        direct = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
        torch.testing.assert_close(out.loss.detach(), direct)


def test_integer_regression_targets_and_integer_multi_hot_targets_are_taken_as_numbers():
    model = BarlowTwinsForImageClassification(BarlowTwinsConfig(**TINY_RESNET, num_labels=1, problem_type="regression"))
    out = model.eval()(torch.randn(3, 3, 32, 32), labels=torch.tensor([1, 5, 2]))
    torch.testing.assert_close(out.loss.detach(), ((out.logits.detach().squeeze() - torch.tensor([1.0, 5, 2])) ** 2).mean())
    model = BarlowTwinsForImageClassification(
        BarlowTwinsConfig(**TINY_RESNET, num_labels=2, problem_type="multi_label_classification")
    ).eval()
    multi_hot = torch.tensor([[1, 0], [1, 1], [0, 0]])
    out = model(torch.randn(3, 3, 32, 32), labels=multi_hot)
    expected = nn.functional.binary_cross_entropy_with_logits(out.logits.detach(), multi_hot.float())
    torch.testing.assert_close(out.loss.detach(), expected)


INCOMPATIBLE = [
    (3, "single_label_classification", torch.tensor([0.0, 2.0]), "'single_label_classification' needs integer class ids, got float32"),
    (3, "single_label_classification", torch.tensor([[0, 1, 0], [1, 0, 0]]), "one class id per image, shape (2,)"),
    (3, "multi_label_classification", torch.tensor([0, 2]), "one 0/1 target per class, shape (2, 3)"),
    (3, None, torch.tensor([0.0, 2.0]), "inferred as 'multi_label_classification' from num_labels=3 and float32 labels"),
    (1, "regression", torch.tensor([[0.5, 1.0], [1.0, 2.0]]), "one target per image, shape (2,)"),
    (3, "regression", torch.tensor([0.5, 1.0]), "targets of shape (2, 3)"),
]


@pytest.mark.parametrize("num_labels,problem_type,labels,message", INCOMPATIBLE, ids=[m for *_, m in INCOMPATIBLE])
def test_incompatible_labels_say_why(num_labels, problem_type, labels, message):
    config = BarlowTwinsConfig(**TINY_RESNET, num_labels=num_labels, problem_type=problem_type)
    model = BarlowTwinsForImageClassification(config).eval()
    with pytest.raises(ValueError) as error:
        model(torch.randn(2, 3, 32, 32), labels=labels)
    assert message in str(error.value)
    assert model.config.problem_type == problem_type  # a failed inference is not recorded


# ----------------------------------------------------------------------------------- initialisation
def _timm_network(spec: dict) -> nn.Module:
    kwargs = dict(spec.get("backbone_kwargs", {}))
    if spec["backbone"].startswith("resnet"):
        kwargs["zero_init_last"] = True
    return timm.create_model(spec["backbone"], pretrained=False, num_classes=0, **kwargs)


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_VIT, TINY_CONVNEXT], ids=["resnet", "vit", "convnext"])
def test_meta_device_model_initialised_afterwards_is_timms_network(spec):
    torch.manual_seed(11)
    expected = _timm_network(spec).state_dict()
    config = BarlowTwinsConfig(**spec)
    with torch.device("meta"):
        model = BarlowTwinsModel(config)
    model.to_empty(device="cpu")
    torch.manual_seed(11)
    model.init_weights()
    got = model.backbone.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def _drop_keys(folder, prefix: str) -> list[str]:
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith(prefix))
    save_file({k: v for k, v in weights.items() if not k.startswith(prefix)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return dropped


def _assert_like_fresh_timm(got: dict, fresh: dict, names) -> None:
    """Statistics of each tensor close to those of a freshly created timm network's."""
    for name in names:
        a, b = got[name].float(), fresh[name].float()
        assert torch.isfinite(a).all(), name
        if b.numel() == 1 or b.std() == 0:  # constants: zeroed BatchNorms, ones, counters, layer-scale
            torch.testing.assert_close(a, b, msg=name)
            continue
        assert abs(a.std() / b.std() - 1) < 0.25, (name, a.std().item(), b.std().item())
        assert abs(a.mean() - b.mean()) < 0.25 * b.std() + 1e-3, (name, a.mean().item(), b.mean().item())


def test_checkpoint_without_backbone_weights_gets_timms_initialisation(tmp_path):
    spec = {**TINY_RESNET, "backbone_kwargs": {"channels": [32, 64, 128, 256]}}
    BarlowTwinsForImageClassification(BarlowTwinsConfig(**spec, num_labels=3)).save_pretrained(tmp_path)
    dropped = _drop_keys(tmp_path, "barlow_twins.backbone.")
    model, info = BarlowTwinsForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) >= {k for k in dropped if not k.endswith("num_batches_tracked")}
    got = model.barlow_twins.backbone.state_dict()
    fresh = _timm_network(spec).state_dict()
    _assert_like_fresh_timm(got, fresh, fresh)
    # timm's ResNet: fan-out Kaiming convolutions, zeroed last BatchNorm in each block, unit variances.
    conv = got["layer3.0.conv1.weight"]
    assert abs(conv.std().item() / math.sqrt(2 / (conv.shape[0] * 9)) - 1) < 0.1
    assert (got["layer2.1.bn2.weight"] == 0).all() and (got["layer2.1.bn1.weight"] == 1).all()
    assert (got["bn1.running_var"] == 1).all()
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32)).logits).all()


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_CONVNEXT], ids=["vit", "convnext"])
def test_partly_missing_checkpoint_keeps_what_it_had(tmp_path, spec):
    model = BarlowTwinsModel(BarlowTwinsConfig(**spec))
    with torch.no_grad():  # saved values unlike any initialisation, so a reinitialised one shows
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    prefix = "backbone.blocks.1." if "vit" in spec["backbone"] else "backbone.stages.2."
    dropped = _drop_keys(tmp_path, prefix)
    loaded = BarlowTwinsModel.from_pretrained(tmp_path).backbone.state_dict()
    for key, value in saved.items():
        if key not in dropped:
            torch.testing.assert_close(loaded[key.removeprefix("backbone.")], value, rtol=0, atol=0, msg=key)
    fresh = _timm_network(spec).state_dict()
    _assert_like_fresh_timm(loaded, fresh, [k.removeprefix("backbone.") for k in dropped])


# ----------------------------------------------------------------------------- gradient checkpointing
def _enable_checkpointing(model) -> None:
    model.activation_checkpointing_enable()  # transformers >= 5.25's name (setup.py)


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_VIT, TINY_CONVNEXT], ids=["resnet", "vit", "convnext"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(spec):
    config = BarlowTwinsConfig(**spec, num_labels=3)
    plain = BarlowTwinsForImageClassification(config).train()
    checkpointed = BarlowTwinsForImageClassification(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.supports_gradient_checkpointing
    _enable_checkpointing(checkpointed)
    assert checkpointed.is_activation_checkpointing

    network = checkpointed.barlow_twins.backbone
    block = network.blocks[1] if hasattr(network, "blocks") else (
        network.layer2[0] if hasattr(network, "layer2") else network.stages[1].blocks[0])
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    for model in (plain, checkpointed):
        model(x, labels=labels).loss.backward()
    assert len(calls) == 2  # run forward, then again during backward: timm's checkpointing is on
    gradients = dict(plain.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        torch.testing.assert_close(parameter.grad, gradients[name].grad, msg=name)


def test_gradient_checkpointing_on_pretraining_model_reaches_timm():
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET))
    _enable_checkpointing(model)
    assert model.barlow_twins.backbone.grad_checkpointing
    model.activation_checkpointing_disable()
    assert not model.barlow_twins.backbone.grad_checkpointing


# ------------------------------------------------------------------------- per-channel statistics
def test_image_mean_and_std_take_one_number_for_every_channel(tmp_path):
    config = BarlowTwinsConfig(**TINY_RESNET, image_size=8, crop_pct=1.0, image_mean=0.25, image_std=0.5)
    assert config.image_mean == [0.25] * 3 and config.image_std == [0.5] * 3
    grey = BarlowTwinsConfig(**{**TINY_RESNET, "backbone_kwargs": {"in_chans": 1}}, image_std=0.5)
    assert grey.image_std == [0.5]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_std"] == [0.5] * 3
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    from PIL import Image

    got = create_image_processor(BarlowTwinsConfig.from_pretrained(tmp_path))(Image.fromarray(pixels), return_tensors="pt")
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.25) / 0.5
    torch.testing.assert_close(got["pixel_values"][0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", ["0.5", [0.5, "a", 1.0], True])
def test_image_std_of_another_type_is_refused(value):
    with pytest.raises(ValueError, match="image_std must be a number or a list of 3 numbers"):
        BarlowTwinsConfig(**TINY_RESNET, image_std=value)
