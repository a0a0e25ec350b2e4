"""Configuration of Barlow Twins models: a timm backbone, the projector and the loss weights."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from dataclasses import field
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


@functools.lru_cache(maxsize=32)
def _feature_stages(backbone: str, timm_kwargs_json: str) -> tuple[tuple[str, int, int], ...]:
    """(module name, channels, stride) of each stage timm's `forward_intermediates` returns, read from
    `feature_info` of a network built on the meta device (no memory; cached per process)."""
    network = _build_on_meta(backbone, json.loads(timm_kwargs_json))
    return tuple((info["module"], int(info["num_chs"]), int(info["reduction"])) for info in network.feature_info)


def _per_channel(name: str, value: Any, num_channels: int) -> list[float]:
    """A float (the same for every channel) or one value per channel, as a list of floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * num_channels
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a number or a list of {num_channels} numbers (one per channel), got {value!r}.")
    return [float(v) for v in value]


def _has_fixed_input_size(name: str) -> bool:
    """Whether timm builds `name` for one input size (position embeddings, fixed windows)."""
    pretrained_cfg = get_pretrained_cfg(name)
    return pretrained_cfg is None or bool(pretrained_cfg.fixed_input_size)


def _default_input_size(name: str) -> int:
    pretrained_cfg = get_pretrained_cfg(name)
    return int(resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})["input_size"][-1])


def _build_on_meta(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    # Arguments can be wrong in ways only timm knows; a build on the meta device (no memory,
    # 0.05 to 0.2 s) reports them at configuration rather than at model construction.
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        shown = {k: v for k, v in kwargs.items() if k != "zero_init_last"}
        raise ValueError(f"timm cannot build {name!r} with backbone_kwargs={shown}: {error}") from error


@functools.lru_cache(maxsize=None)
def _constructor_arguments(name: str) -> frozenset[str]:
    """The arguments of the class timm builds for `name`: its entry point hides them in **kwargs,
    and subclasses (DeiT distilled, LeViT distilled) pass theirs on to the parent's in **kwargs."""
    names: set[str] = set()
    for cls in type(_build_on_meta(name, {})).__mro__:
        if cls is torch.nn.Module:
            break
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(vars(cls)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return frozenset(names)


@functools.lru_cache(maxsize=128)
def _check_network(
    name: str, kwargs_json: str, image_size: int, num_channels: int, small_image_stem: bool, check_input_size: bool
) -> None:
    """Raise ValueError if timm cannot build `name` with these arguments, or (`check_input_size`)
    cannot run it on `image_size` px inputs. Cached: configs are rebuilt often (from_pretrained)."""
    kwargs = json.loads(kwargs_json)
    network = _build_on_meta(name, kwargs)
    if small_image_stem and not isinstance(getattr(network, "conv1", None), torch.nn.Conv2d):
        raise ValueError(
            f"small_image_stem needs a single-convolution stem, but {name!r} has a deep stem. "
            f"Use a plain ResNet such as resnet18 or resnet50."
        )
    if not check_input_size:
        return
    patch = getattr(getattr(network, "patch_embed", None), "patch_size", None)
    if patch is not None and not kwargs.get("dynamic_img_pad", False):
        patch = max(patch) if isinstance(patch, (tuple, list)) else int(patch)
        if image_size % patch:
            fits = sorted({max(patch, image_size // patch * patch), (image_size // patch + 1) * patch})
            raise ValueError(
                f"image_size={image_size} is not a multiple of the patch size {patch} of {name!r}. Use image_size "
                f"{' or '.join(map(str, fits))}, or a patch size that divides {image_size} "
                f'(backbone_kwargs={{"patch_size": ...}}).'
            )
    try:
        with torch.no_grad():
            network.eval().forward_features(torch.empty(2, num_channels, image_size, image_size, device="meta"))
    except NotImplementedError:
        return  # an operation the meta device lacks: the real forward will tell
    except (AssertionError, RuntimeError, ValueError) as error:
        raise ValueError(f"{name!r} cannot take {image_size} px inputs: {error}") from error


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
        self._fit_backbone_to_input_size()
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
        """Ignored on purpose: the stages are always derived from the backbone, and transformers'
        backbone code assigns them (as does loading a saved config that lists them)."""

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

    def _fit_backbone_to_input_size(self) -> None:
        """Give `image_size` to backbones built for one input size (ViT, DeiT, Swin, ...), then
        check on the meta device that the network builds and takes `image_size` inputs."""
        fixed_size = _has_fixed_input_size(self.backbone)
        if not (fixed_size or self.backbone_kwargs or self.small_image_stem):
            return  # a stock CNN: any input size, nothing timm could refuse
        if fixed_size:
            self._pass_image_size()
        _check_network(
            self.backbone, json.dumps(self.timm_kwargs(), sort_keys=True), self.image_size, self.num_channels,
            self.small_image_stem, fixed_size,
        )

    def _pass_image_size(self) -> None:
        accepted = _constructor_arguments(self.backbone)
        if "img_size" not in accepted:
            default = _default_input_size(self.backbone)
            if self.image_size != default:
                raise ValueError(
                    f"{self.backbone!r} takes {default} px inputs only: timm builds it for one input size and "
                    f"has no img_size argument for it. Use image_size={default} (--image_size {default}), or a "
                    f"backbone whose input size can change (a ViT, DeiT, Swin or any CNN)."
                )
            return
        # Written into backbone_kwargs, so the saved config and timm-format exports (model_args)
        # rebuild the same network. dynamic_img_size lets the encoder take other sizes too
        # (position embeddings resampled), as pipelines on other resolutions need.
        self.backbone_kwargs["img_size"] = self.image_size
        if "dynamic_img_size" in accepted:
            self.backbone_kwargs.setdefault("dynamic_img_size", True)

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
        self._resolve_image_size(int(data["input_size"][-1]))
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

    def _resolve_image_size(self, default: int) -> None:
        # backbone_kwargs' img_size (timm's name) and image_size are one setting: either may be given.
        timm_size = self.backbone_kwargs.get("img_size")
        if isinstance(timm_size, (list, tuple)) and len(set(timm_size)) == 1:
            timm_size = timm_size[0]
        if timm_size is not None and not (isinstance(timm_size, int) and timm_size > 0):
            raise ValueError(f"backbone_kwargs img_size must be one positive integer (square images), got {timm_size!r}.")
        if self.image_size is None:
            self.image_size = timm_size if timm_size is not None else default
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}.")
        if timm_size is not None and timm_size != self.image_size:
            raise ValueError(
                f"image_size={self.image_size} disagrees with backbone_kwargs img_size={timm_size}; give only image_size."
            )

    @property
    def embedding_dim(self) -> int:
        """D, the width of the projector's output and of the cross-correlation matrix."""
        return self.projector_dims[-1]
