"""Parts of modeling_barlow_twins that whole-model tests pass over, each against a value written out
here or torch's own draw: the linear-evaluation head from a given generator, the projector's layout
for more widths, the auto_map every saved config carries (merged with one it had), the arguments
save_pretrained passes on, a classifier that starts unfrozen, and the refusal of gradient
checkpointing on a network without it. Fast enough for mutation testing (benchmarks/mutation.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsModel,
    BarlowTwinsProjector,
    init_linear_evaluation_head,
)

from ..conftest import TINY_RESNET


def test_linear_evaluation_head_draws_from_the_given_generator():
    head = init_linear_evaluation_head(nn.Linear(6, 4), generator=torch.Generator().manual_seed(5))
    expected = torch.empty(4, 6).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(head.weight.data, expected, rtol=0, atol=0)
    assert (head.bias == 0).all()


def test_projector_has_a_hidden_block_for_every_width_but_the_last():
    projector = BarlowTwinsProjector(10, [12, 14, 16, 8])
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]
    linears = [layer for layer in projector if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(10, 12), (12, 14), (14, 16), (16, 8)]
    assert all(layer.bias is None for layer in linears)


AUTO_MAP = {
    "AutoConfig": "configuration_barlow_twins.BarlowTwinsConfig",
    "AutoModel": "modeling_barlow_twins.BarlowTwinsModel",
    "AutoModelForPreTraining": "modeling_barlow_twins.BarlowTwinsForPreTraining",
    "AutoModelForImageClassification": "modeling_barlow_twins.BarlowTwinsForImageClassification",
    "AutoBackbone": "modeling_barlow_twins.BarlowTwinsBackbone",
}


def test_saved_config_maps_every_auto_class_and_keeps_other_entries(tmp_path):
    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET))
    model.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["auto_map"] == AUTO_MAP
    model.config.auto_map = {"AutoImageProcessor": "processing.MyProcessor"}
    model.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())["auto_map"]
    assert saved == {"AutoImageProcessor": "processing.MyProcessor", **AUTO_MAP}


def test_save_pretrained_passes_positional_and_keyword_arguments_on(tmp_path):
    from safetensors.torch import load_file

    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET))
    # transformers' third parameter, state_dict: what to write instead of the model's own.
    only = {"backbone.conv1.weight": torch.ones_like(model.backbone.conv1.weight)}
    model.save_pretrained(tmp_path / "positional", True, only)
    saved = load_file(tmp_path / "positional" / "model.safetensors")
    assert set(saved) == {"backbone.conv1.weight"} and (saved["backbone.conv1.weight"] == 1).all()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()


def test_a_new_classifier_trains_its_encoder():
    model = BarlowTwinsForImageClassification(BarlowTwinsConfig(**TINY_RESNET, num_labels=2)).train()
    assert model.barlow_twins.backbone.bn1.training
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_checkpointing_a_network_without_it_is_refused():
    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET))

    class NoCheckpointing(nn.Module):
        def forward(self, x):
            return x

    model.backbone = NoCheckpointing()
    with pytest.raises(ValueError) as error:
        model.activation_checkpointing_enable()
    assert str(error.value) == "timm's NoCheckpointing does not support gradient checkpointing."


def test_a_new_model_is_not_checkpointing_and_takes_both_views_in_one_forward():
    from modeling_barlow import BarlowTwinsForPreTraining

    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET))
    assert not model.is_activation_checkpointing
    calls = []
    model.barlow_twins.backbone.conv1.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert calls == [8]  # both views stacked, one forward (two forwards only under checkpointing)
