"""`_init_weights` initialises every parameter and buffer of every model class, the way its owner
does: the timm network as timm builds it, the projector's BatchNorm as BatchNorm resets itself, the
classifier as the linear-evaluation protocol. Checked for a model built on the meta device and for a
checkpoint that lacks one tensor, against references computed here without our code: a timm network
built from the same random state, `BatchNorm1d.reset_running_stats`, nn.Linear's own bounds.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modeling_barlow import (
    BarlowTwinsBackbone,
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
)

from ..conftest import TINY_RESNET


TINY_VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
            "projector_dims": [32, 32]}
TINY_CONVNEXT = {"backbone": "convnext_atto", "backbone_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
                 "projector_dims": [32, 32]}
SPECS = {
    "resnet": TINY_RESNET,
    "resnet-small-stem": {**TINY_RESNET, "small_image_stem": True},
    "convnext": TINY_CONVNEXT,
    "vit": TINY_VIT,
}
CLASSES = [BarlowTwinsModel, BarlowTwinsForPreTraining, BarlowTwinsForImageClassification, BarlowTwinsBackbone]
# Per backbone, a weight whose init is timm's own (not transformers' generic one).
TIMM_WEIGHT = {"resnet": "layer2.0.conv1.weight", "resnet-small-stem": "conv1.weight",
               "convnext": "stages.1.blocks.0.conv_dw.weight", "vit": "blocks.0.attn.qkv.weight"}


def _config(spec: dict) -> BarlowTwinsConfig:
    return BarlowTwinsConfig(**spec, image_size=32, num_labels=3)


def _timm_network(spec: dict) -> nn.Module:
    """The network as timm itself builds it from the current random state."""
    kwargs = dict(spec.get("backbone_kwargs", {}))
    if spec["backbone"].startswith("resnet"):
        kwargs["zero_init_last"] = True
    network = timm.create_model(spec["backbone"], pretrained=False, num_classes=0, **kwargs)
    if spec.get("small_image_stem"):  # the CIFAR stem: a 3x3 conv drawn as timm draws ResNet convs
        network.conv1 = nn.Conv2d(3, network.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(network.conv1.weight, mode="fan_out", nonlinearity="relu")
    return network


def _encoder(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, BarlowTwinsModel) else model.barlow_twins.backbone


def _fresh_batchnorm_state(width: int) -> dict[str, torch.Tensor]:
    reference = nn.BatchNorm1d(width)
    with torch.no_grad():
        reference.weight.fill_(7.0), reference.bias.fill_(7.0), reference.running_mean.fill_(7.0)
    reference.running_var.fill_(7.0), reference.num_batches_tracked.fill_(7)
    reference.reset_parameters()  # BatchNorm's own reset: reset_running_stats, unit weight, zero bias
    return reference.state_dict()


def _assert_heads_initialised(model: nn.Module) -> None:
    """Projector and classifier (where the class has them) as their owners initialise them."""
    if hasattr(model, "projector"):
        for layer in model.projector:
            if isinstance(layer, nn.BatchNorm1d):
                for name, expected in _fresh_batchnorm_state(layer.num_features).items():
                    torch.testing.assert_close(layer.state_dict()[name], expected, rtol=0, atol=0, msg=name)
            elif isinstance(layer, nn.Linear):  # nn.Linear's kaiming-uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1 / math.sqrt(layer.in_features)
                assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 3
    if hasattr(model, "classifier"):  # the linear-evaluation head: N(0, 0.01), zero bias
        assert abs(model.classifier.weight.std().item() / 0.01 - 1) < 0.3
        assert (model.classifier.bias == 0).all()


@pytest.mark.parametrize("model_class", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec_name", SPECS)
def test_model_built_on_meta_device_initialises_every_tensor(spec_name, model_class):
    spec = SPECS[spec_name]
    with torch.device("meta"):
        model = model_class(_config(spec))
    model.to_empty(device="cpu")
    with torch.no_grad():  # memory to_empty left behind could pass for a value: make it unmistakable
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-1)
    torch.manual_seed(3)
    model.init_weights()
    torch.manual_seed(3)
    expected = _timm_network(spec).state_dict()  # the network is initialised first, from the same state

    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
    got = _encoder(model).state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    _assert_heads_initialised(model)


def _drop(folder, key: str) -> None:
    weights = load_file(folder / "model.safetensors")
    assert key in weights
    del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("model_class", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec_name", SPECS)
def test_checkpoint_without_a_timm_weight_loads_it_as_timm_initialises_it(tmp_path, spec_name, model_class):
    spec = SPECS[spec_name]
    saved_model = BarlowTwinsForPreTraining(_config(spec))
    with torch.no_grad():  # saved values unlike any initialisation, so one reinitialised by mistake shows
        for parameter in saved_model.parameters():
            parameter.add_(1.0)
    saved_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    dropped = "barlow_twins.backbone." + TIMM_WEIGHT[spec_name]
    _drop(tmp_path, dropped)

    torch.manual_seed(5)
    model = model_class.from_pretrained(tmp_path)
    torch.manual_seed(5)
    expected = _timm_network(spec).state_dict()[TIMM_WEIGHT[spec_name]]

    got = _encoder(model).state_dict()
    torch.testing.assert_close(got[TIMM_WEIGHT[spec_name]], expected, rtol=0, atol=0)
    for key, value in saved.items():  # everything else as saved
        name = key.removeprefix("barlow_twins.backbone.")
        if key != dropped and name in got:
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("buffer", ["running_mean", "running_var", "num_batches_tracked"])
def test_checkpoint_without_a_projector_batchnorm_buffer_loads_it_reset(tmp_path, buffer):
    model = BarlowTwinsForPreTraining(_config(TINY_RESNET)).train()
    model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))  # running statistics away from their reset
    model.save_pretrained(tmp_path)
    _drop(tmp_path, f"projector.1.{buffer}")

    loaded = BarlowTwinsForPreTraining.from_pretrained(tmp_path).eval()
    batchnorm = loaded.projector[1]
    torch.testing.assert_close(
        batchnorm.state_dict()[buffer], _fresh_batchnorm_state(batchnorm.num_features)[buffer], rtol=0, atol=0
    )
    for name in {"running_mean", "running_var", "weight", "bias"} - {buffer}:  # the rest as trained
        torch.testing.assert_close(batchnorm.state_dict()[name], model.projector[1].state_dict()[name], rtol=0, atol=0)
    assert torch.isfinite(loaded(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)).loss)
