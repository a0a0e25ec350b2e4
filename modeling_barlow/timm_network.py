"""The timm network inside every Barlow Twins model: building it, initialising what a checkpoint
lacked the way timm does, and reading its stages.

Imports only torch, timm and transformers: copied into saved folders as remote code.
"""

from __future__ import annotations

from itertools import chain

import timm
import torch
from torch import nn

from .configuration_barlow_twins import BarlowTwinsConfig


__all__ = [
    "create_timm_network",
    "forward_stages",
    "initialise_missing_like_timm",
    "mark_drawn_by_timm",
    "stage_feature_maps",
    "was_drawn_by_timm_just_now",
]


def create_timm_network(config: BarlowTwinsConfig) -> nn.Module:
    """The headless timm network the config describes, initialised by timm."""
    network = timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.timm_kwargs())
    if config.small_image_stem:
        _use_small_image_stem(network, config.backbone)
    return network


def _use_small_image_stem(network: nn.Module, name: str) -> None:
    # timm's ResNet has no option for this stem, so the 7x7/2 conv and the max-pool are swapped
    # for a 3x3/1 conv of the same width: 32 px inputs keep their resolution into layer1.
    stem = getattr(network, "conv1", None)
    if not isinstance(stem, nn.Conv2d):
        raise ValueError(
            f"small_image_stem needs a single-convolution stem, but {name!r} has a deep stem "
            f"({type(stem).__name__}). Use a plain ResNet such as resnet18 or resnet50."
        )
    conv = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # timm ResNet's conv init
    network.conv1 = conv
    network.maxpool = nn.Identity()


def _random_state(device: torch.device) -> list[torch.Tensor]:
    # The generators timm's init draws from on `device`: the CPU's, and the accelerator's own.
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def mark_drawn_by_timm(network: nn.Module) -> None:
    """Record, on a network timm has just built and initialised, the random state its init left."""
    first = next(chain(network.parameters(), network.buffers()), None)
    if first is not None and not first.is_meta:
        network.__dict__["_random_state_after_timm"] = _random_state(first.device)


def was_drawn_by_timm_just_now(network: nn.Module) -> bool:
    """Whether `network` holds timm's init drawn from the random state that the same stream would
    give it now: marked by `mark_drawn_by_timm`, and nothing has drawn or reseeded since. Then
    initialising it again would only change the stream. Reading clears the mark."""
    state = network.__dict__.pop("_random_state_after_timm", None)
    if state is None:
        return False
    first = next(chain(network.parameters(), network.buffers()))
    now = _random_state(first.device)
    return len(now) == len(state) and all(torch.equal(a, b) for a, b in zip(state, now))


@torch.no_grad()
def initialise_missing_like_timm(network: nn.Module, config: BarlowTwinsConfig) -> int:
    """Give every tensor of `network` that transformers has not marked as loaded
    (`_is_hf_initialized`) the value timm's own initialisation gives it; returns how many.

    transformers initialises module by module, but timm's schemes are per model (ResNet's fan-out
    convolutions and zeroed last BatchNorms, ViT's truncated normals, position embeddings and
    tokens, ConvNeXt's head scale, ...). Only a freshly built network has exactly them, so one is
    built (on the tensors' device, seeded by the global RNG) and its values copied over. Loaded
    tensors are left alone; when nothing is missing nothing is built.
    """
    pending = [
        (name, tensor)
        for name, tensor in chain(network.named_parameters(), network.named_buffers())
        if not getattr(tensor, "_is_hf_initialized", False) and not tensor.is_meta
    ]
    if not pending:
        return 0
    with torch.device(pending[0][1].device):
        fresh = create_timm_network(config)
    reference = dict(chain(fresh.named_parameters(), fresh.named_buffers()))
    copied = 0
    for name, tensor in pending:
        value = reference.get(name)
        if value is not None and value.shape == tensor.shape:
            tensor.copy_(value)
            copied += 1
    return copied


def forward_stages(network: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(timm's `forward_features` output, the feature map of every stage).

    The stages are those of timm's `forward_intermediates` and `feature_info`: for a ResNet the stem
    (after its activation, before the max-pool) and each of the four layers; for a ConvNeXt each
    stage; for a ViT each block's tokens without the prefix tokens, as (B, C, H/patch, W/patch) maps.
    """
    last, intermediates = _forward_intermediates(network)(pixel_values)
    return last, list(intermediates)


def stage_feature_maps(network: nn.Module, pixel_values: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """The feature maps of the stages at `indices` only; the network stops after the last of them."""
    return list(_forward_intermediates(network)(pixel_values, indices=indices, stop_early=True, intermediates_only=True))


def _forward_intermediates(network: nn.Module):
    if not hasattr(network, "forward_intermediates"):
        raise ValueError(
            f"timm's {type(network).__name__} has no forward_intermediates (timm {timm.__version__}), so its hidden "
            "states and stage feature maps cannot be returned. Pick another backbone or update timm."
        )
    return network.forward_intermediates
