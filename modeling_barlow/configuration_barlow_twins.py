"""Configuration of Barlow Twins models: a timm backbone, the projector and the loss weights."""

from __future__ import annotations

import difflib
import json
from dataclasses import field
from functools import lru_cache
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, is_model_in_modules
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


__all__ = ["BarlowTwinsConfig"]

# timm families whose model classes take `zero_init_last` (timm's name for zero_init_residual).
ZERO_INIT_MODULES = ("resnet", "resnetv2", "regnet", "byobnet", "cspnet")
# The small-image stem swaps timm ResNet's `conv1` and `maxpool`, which only that family has.
SMALL_STEM_MODULES = ("resnet",)
# Arguments the model owns itself; taking them from backbone_kwargs would build a different net.
RESERVED_BACKBONE_KWARGS = {
    "num_classes": "the model is headless by construction; use BarlowTwinsForImageClassification(num_labels=...)",
    "pretrained": "weights are never downloaded at build time; load them with from_pretrained or hub/ converters",
    "pretrained_cfg": "the preprocessing is set by image_size, image_mean, image_std, crop_pct and interpolation",
    "zero_init_last": "use zero_init_residual",
}


@lru_cache(maxsize=32)
def _feature_stages(backbone: str, timm_kwargs_json: str) -> tuple[tuple[str, int, int], ...]:
    """(module name, channels, stride) of each stage timm's `forward_intermediates` returns, read from
    `feature_info` of a network built on the meta device (no memory; cached per process)."""
    with torch.device("meta"):
        network = timm.create_model(backbone, pretrained=False, num_classes=0, **json.loads(timm_kwargs_json))
    return tuple((info["module"], int(info["num_chs"]), int(info["reduction"])) for info in network.feature_info)


def _per_channel(name: str, value: Any, num_channels: int) -> list[float]:
    """A float (the same for every channel) or one value per channel, as a list of floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * num_channels
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a number or a list of {num_channels} numbers (one per channel), got {value!r}.")
    return [float(v) for v in value]


def _unknown_backbone_message(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Closest timm names: {', '.join(close)}." if close else " See timm.list_models() for the names."
    return f"backbone={name!r} is not a timm model (timm {timm.__version__}).{hint}"


class BarlowTwinsConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration for [`BarlowTwinsModel`], [`BarlowTwinsForPreTraining`] and
    [`BarlowTwinsForImageClassification`].

    Args:
        backbone (`str`, defaults to `"resnet50"`): any timm model name.
        backbone_kwargs (`dict`, *optional*): passed to `timm.create_model`, e.g. `in_chans`,
            `drop_path_rate` or `channels`. `num_classes` and `pretrained` are refused.
        small_image_stem (`bool`, defaults to `False`): ResNet family only: a 3x3 stride-1 first
            convolution and no max-pool, the convention for 32 px images.
        zero_init_residual (`bool`, defaults to `True`): zero the last BatchNorm of each residual
            block (timm's `zero_init_last`), where the backbone family supports it.
        projector_dims (`list[int]`, defaults to `[8192, 8192, 8192]`): widths of the projector's
            linear layers; the last is the embedding dimension D of the loss.
        off_diagonal_weight (`float`, defaults to 0.0051): the paper's lambda.
        loss_scale (`float`, defaults to 1.0): multiplies the whole loss.
        image_size, num_channels, image_mean, image_std, crop_pct, interpolation: preprocessing;
            when left out they are resolved from timm's data config for `backbone`. `image_mean` and
            `image_std` take one value per channel or a single number for all channels.
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*): the stages
            [`BarlowTwinsBackbone`] returns, by name or index into `stage_names` (timm's `feature_info`
            modules, e.g. `["act1", "layer1", "layer2", "layer3", "layer4"]` for a ResNet, where
            `act1` is the stem). Default: the last stage.

    Example:
        >>> from modeling_barlow import BarlowTwinsConfig
        >>> config = BarlowTwinsConfig(backbone="resnet18", projector_dims=[512, 512])
        >>> config.image_size, config.interpolation
        (224, 'bicubic')
    """

    model_type = "barlow_twins"

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] | None = None
    small_image_stem: bool = False
    zero_init_residual: bool = True
    projector_dims: list[int] = field(default_factory=lambda: [8192, 8192, 8192])
    off_diagonal_weight: float = 0.0051
    loss_scale: float = 1.0
    image_size: int | None = None
    num_channels: int | None = None
    image_mean: list[float] | float | None = None
    image_std: list[float] | float | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    def __post_init__(self, **kwargs):
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        self._validate_backbone()
        self._validate_projector_and_loss()
        self._resolve_preprocessing()
        # Backbone outputs: resolved against timm's stages only when asked for (that needs a meta build).
        kwargs.pop("stage_names", None)  # derived from the backbone; a saved copy is only informative
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        self._out_features = self._out_indices = None
        if out_features is not None or out_indices is not None:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------------- backbone stages
    @property
    def stage_names(self) -> list[str]:
        """The stages a backbone can return: timm's `feature_info` module names, stem first for CNNs."""
        return [name for name, _, _ in self.feature_stages()]

    @stage_names.setter
    def stage_names(self, value: Any) -> None:
        pass  # always derived from the backbone (transformers' backbone code assigns it)

    def feature_stages(self) -> tuple[tuple[str, int, int], ...]:
        """(name, channels, stride) of every stage, as timm's `feature_info` gives them."""
        stages = _feature_stages(self.backbone, json.dumps(self.timm_kwargs(), sort_keys=True))
        if self.small_image_stem:  # no stride-2 stem convolution and no max-pool: strides shrink 2x and 4x
            stages = tuple((name, chs, 1 if i == 0 else stride // 4) for i, (name, chs, stride) in enumerate(stages))
        return stages

    def set_output_features_output_indices(self, out_features: list | None, out_indices: list | None) -> None:
        # transformers' own check names the stages but not the valid indices, and wraps a negative
        # index that is out of range (-10 of 5 stages) into a valid one; check first, saying what exists.
        if out_indices is not None:
            out_indices = list(out_indices)
            count = len(self.stage_names)
            bad = [i for i in out_indices if not isinstance(i, int) or isinstance(i, bool) or not -count <= i < count]
            if bad:
                raise ValueError(
                    f"out_indices={out_indices} goes beyond the {count} stages of {self.backbone!r}; valid indices are 0 to {count - 1} "
                    f"(or -{count} to -1): {self._describe_stages()}."
                )
        if out_features is not None:
            unknown = [f for f in out_features if f not in self.stage_names]
            if unknown:
                raise ValueError(
                    f"out_features={list(out_features)}: {', '.join(map(repr, unknown))} is not a stage of {self.backbone!r}; "
                    f"its stages are {self._describe_stages()}."
                )
        super().set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def _describe_stages(self) -> str:
        return ", ".join(f"{i}={name} ({chs} channels, stride {stride})" for i, (name, chs, stride) in enumerate(self.feature_stages()))

    def _validate_backbone(self) -> None:
        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            raise ValueError(_unknown_backbone_message(str(self.backbone)))
        for key, why in RESERVED_BACKBONE_KWARGS.items():
            if key in self.backbone_kwargs:
                raise ValueError(f"backbone_kwargs may not contain {key!r}: {why}.")
        if self.small_image_stem and not is_model_in_modules(self.backbone, SMALL_STEM_MODULES):
            raise ValueError(
                f"small_image_stem=True applies to timm's ResNet family (resnet18, resnet50, ...), "
                f"not to {self.backbone!r}. Set small_image_stem=False, or pick a ResNet backbone."
            )
        if self.backbone_kwargs or self.small_image_stem:
            self._check_buildable()

    def _check_buildable(self) -> None:
        # Extra arguments can be wrong in ways only timm knows; a build on the meta device
        # (no memory, ~0.1 s) reports them now rather than at model construction.
        try:
            with torch.device("meta"):
                network = timm.create_model(self.backbone, pretrained=False, num_classes=0, **self.timm_kwargs())
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(
                f"timm cannot build {self.backbone!r} with backbone_kwargs={self.backbone_kwargs}: {error}"
            ) from error
        if self.small_image_stem and not isinstance(getattr(network, "conv1", None), torch.nn.Conv2d):
            raise ValueError(
                f"small_image_stem needs a single-convolution stem, but {self.backbone!r} has a deep stem. "
                f"Use a plain ResNet such as resnet18 or resnet50."
            )

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `timm.create_model` (besides `num_classes=0`)."""
        kwargs = dict(self.backbone_kwargs)
        if is_model_in_modules(self.backbone, ZERO_INIT_MODULES):
            kwargs["zero_init_last"] = self.zero_init_residual
        return kwargs

    def _validate_projector_and_loss(self) -> None:
        dims = self.projector_dims
        if (
            not isinstance(dims, (list, tuple))
            or not dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
        ):
            raise ValueError(
                f"projector_dims must be a non-empty list of positive integers such as [8192, 8192, 8192], got {dims!r}."
            )
        self.projector_dims = list(dims)
        for name in ("off_diagonal_weight", "loss_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")

    def _resolve_preprocessing(self) -> None:
        pretrained_cfg = get_pretrained_cfg(self.backbone)
        data = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
        channels = self.backbone_kwargs.get("in_chans", data["input_size"][0])
        if self.num_channels is None:
            self.num_channels = int(channels)
        elif self.num_channels != channels:
            raise ValueError(
                f"num_channels={self.num_channels} disagrees with the backbone's in_chans={channels}; "
                f"set backbone_kwargs={{'in_chans': {self.num_channels}}}."
            )
        if self.image_size is None:
            self.image_size = int(data["input_size"][-1])
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}.")
        mean, std = list(data["mean"]), list(data["std"])
        if len(mean) != self.num_channels:
            # timm's statistics are per RGB channel; other channel counts use their average.
            mean, std = [sum(mean) / len(mean)] * self.num_channels, [sum(std) / len(std)] * self.num_channels
        self.image_mean = _per_channel("image_mean", self.image_mean, self.num_channels) if self.image_mean is not None else mean
        self.image_std = _per_channel("image_std", self.image_std, self.num_channels) if self.image_std is not None else std
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"image_mean and image_std need {self.num_channels} values each (one per channel).")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std values must be positive, got {self.image_std}.")
        if self.crop_pct is None:
            self.crop_pct = float(data["crop_pct"])
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")
        if self.interpolation is None:
            self.interpolation = str(data["interpolation"])
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear', 'bicubic' or 'nearest', got {self.interpolation!r}.")

    @property
    def embedding_dim(self) -> int:
        """D, the width of the projector's output and of the cross-correlation matrix."""
        return self.projector_dims[-1]
