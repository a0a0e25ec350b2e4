"""barlow-convert on files laid out exactly like the authors' release, with random weights.

The reference is torchvision's resnet50 (the authors' backbone) and a projector built like theirs;
the converted encoder and projector must compute the same outputs.
"""

from __future__ import annotations

import importlib
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from hub import convert_checkpoint, official_to_model
from modeling_barlow import BarlowTwinsForPreTraining


convert_module = importlib.import_module("hub.convert_official")
D = 64  # projector width: the release's is 8192; small keeps the test fast


class AuthorsBarlowTwins(nn.Module):
    """The module tree of facebookresearch/barlowtwins' main.py (weights only, no loss)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.backbone = torchvision.models.resnet50(weights=None, zero_init_residual=True)
        self.backbone.fc = nn.Identity()
        sizes = [2048, *sizes]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [
                nn.Linear(sizes[i], sizes[i + 1], bias=False),
                nn.BatchNorm1d(sizes[i + 1]),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)


class DistributedLike(nn.Module):
    """Saving DistributedDataParallel's state dict prefixes every key with `module.`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


@pytest.fixture(scope="module")
def authors_model() -> AuthorsBarlowTwins:
    torch.manual_seed(0)
    model = AuthorsBarlowTwins([D, D, D])
    with torch.no_grad():  # trained-looking BatchNorms (zero_init_residual zeroed some weights)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(authors_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    torch.save(authors_model.backbone.state_dict(), folder / "resnet50.pth")
    optimizer = torch.optim.SGD(
        [{"params": [p for p in authors_model.parameters() if p.ndim > 1]}], lr=0.1, momentum=0.9
    )
    state = {"epoch": 1000, "model": DistributedLike(authors_model).state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, folder / "checkpoint.pth")
    return folder


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_backbone_file_becomes_a_timm_encoder_equal_to_torchvision(checkpoints, authors_model, images, tmp_path):
    state = torch.load(checkpoints / "resnet50.pth", weights_only=True)
    assert not any(key.startswith("fc.") for key in state) and "layer1.0.conv1.weight" in state
    with torch.no_grad():
        expected = authors_model.backbone(images)

    result = convert_checkpoint(checkpoints / "resnet50.pth", tmp_path / "out")
    assert (result.encoder_format, result.pretraining_subfolder) == ("timm", None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "resnet50" and "num_classes" not in config.get("model_args", {})
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224] and config["pretrained_cfg"]["crop_pct"] == 0.875
    # The converted encoder, rebuilt by plain timm from the folder alone.
    network = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(network(images), expected, atol=1e-4, rtol=1e-4)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: mit" in card and "facebookresearch/barlowtwins" in card


def test_full_checkpoint_keeps_the_projector_and_drops_the_final_batchnorm(
    checkpoints, authors_model, images, tmp_path, capsys
):
    assert None is convert_module.main(
        ["--checkpoint", str(checkpoints / "checkpoint.pth"), "--output_dir", str(tmp_path / "out")]
    )
    # The timm-format encoder at the root, the full model (projector included) below it.
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architecture"] == "resnet50"
    model = BarlowTwinsForPreTraining.from_pretrained(tmp_path / "out" / "pretraining").eval()
    assert model.config.projector_dims == [D, D, D] and model.config.backbone == "resnet50"
    network = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        features = authors_model.backbone(images)
        projections = authors_model.projector(features)
        out = model(images)
        torch.testing.assert_close(out.pooler_output, features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.projections, projections, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(network(images), features, atol=1e-4, rtol=1e-4)
    assert "module.bn.running_mean" in (tmp_path / "out" / "README.md").read_text()
    assert "Converted" in capsys.readouterr().out


def test_format_choices(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="needs the projector"):
        convert_checkpoint(checkpoints / "resnet50.pth", tmp_path / "a", format="full")
    result = convert_checkpoint(checkpoints / "checkpoint.pth", tmp_path / "b", format="full")
    assert (result.encoder_format, result.pretraining_subfolder) == (None, "")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == ["BarlowTwinsForPreTraining"]


class Payload:
    """Unpickling this would create `marker`: exactly what weights_only loading must prevent."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_files_that_need_arbitrary_unpickling_are_refused(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert_module.main(["--checkpoint", str(tmp_path / "evil.pth"), "--output_dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2  # a file to change, as for every file none of the authors' formats (1 before #35)
    assert message.startswith("barlow-convert: error: Refusing") and "weights-only" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unrecognised_files_list_what_was_expected(tmp_path, authors_model):
    with pytest.raises(ValueError, match="Expected one of the authors' two files"):
        official_to_model({"weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="Expected one of the authors' two files"):
        official_to_model([1, 2, 3])
    with_fc = torchvision.models.resnet50(weights=None).state_dict()
    with pytest.raises(ValueError, match="fc"):
        official_to_model(with_fc)
    broken = DistributedLike(authors_model).state_dict()
    broken["module.head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="module.head.weight"):
        official_to_model({"epoch": 1, "model": broken, "optimizer": {}})
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        convert_checkpoint(tmp_path / "junk.pth", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "out")
