"""Barlow Twins (Zbontar et al., ICML 2021) on any timm backbone, as transformers models.

Three heads share one encoder, `BarlowTwinsModel`, stored under `barlow_twins.` so weights move
between them with `from_pretrained`:

* `BarlowTwinsForPreTraining`: encoder, projector and the twin loss.
* `BarlowTwinsForImageClassification`: encoder and a linear classifier (fine-tuning, probing).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput
from transformers.utils import can_return_tuple

from .configuration_barlow_twins import BarlowTwinsConfig
from .loss import barlow_twins_loss


__all__ = [
    "BarlowTwinsForImageClassification",
    "BarlowTwinsForPreTraining",
    "BarlowTwinsForPreTrainingOutput",
    "BarlowTwinsModel",
    "BarlowTwinsPreTrainedModel",
    "BarlowTwinsProjector",
]

# Written into every saved config, so the folder loads with trust_remote_code whichever head saved it.
AUTO_MAP = {
    "AutoConfig": "configuration_barlow_twins.BarlowTwinsConfig",
    "AutoModel": "modeling_barlow_twins.BarlowTwinsModel",
    "AutoModelForPreTraining": "modeling_barlow_twins.BarlowTwinsForPreTraining",
    "AutoModelForImageClassification": "modeling_barlow_twins.BarlowTwinsForImageClassification",
}


@dataclass
class BarlowTwinsForPreTrainingOutput(ModelOutput):
    r"""Output of [`BarlowTwinsForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the Barlow Twins loss (fp32), present
            when two views were given.
        on_diagonal_loss (`torch.FloatTensor` of shape `()`, *optional*): `sum_i (1 - C_ii)^2`.
        off_diagonal_loss (`torch.FloatTensor` of shape `()`, *optional*): `sum_{i != j} C_ij^2`,
            before `off_diagonal_weight`.
        diagonal_mean (`torch.FloatTensor` of shape `()`, *optional*): `mean_i C_ii`, 1 at the
            optimum; with `off_diagonal_loss / (D * (D - 1))` it reads the same at any width D.
        projections (`torch.FloatTensor` of shape `(batch_size, D)`): projector output, first view.
        projections_2 (`torch.FloatTensor` of shape `(batch_size, D)`, *optional*): second view.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, num_features)`): encoder
            embedding of the first view.
    """

    loss: torch.FloatTensor | None = None
    on_diagonal_loss: torch.FloatTensor | None = None
    off_diagonal_loss: torch.FloatTensor | None = None
    diagonal_mean: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    projections_2: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


def _create_backbone(config: BarlowTwinsConfig) -> nn.Module:
    """The headless timm network the config describes; timm's own initialisation is kept."""
    backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.timm_kwargs())
    if config.small_image_stem:
        _use_small_image_stem(backbone, config.backbone)
    return backbone


def _use_small_image_stem(backbone: nn.Module, name: str) -> None:
    # timm's ResNet has no option for this stem, so the 7x7/2 conv and the max-pool are swapped
    # for a 3x3/1 conv of the same width: 32 px inputs keep their resolution into layer1.
    stem = getattr(backbone, "conv1", None)
    if not isinstance(stem, nn.Conv2d):
        raise ValueError(
            f"small_image_stem needs a single-convolution stem, but {name!r} has a deep stem "
            f"({type(stem).__name__}). Use a plain ResNet such as resnet18 or resnet50."
        )
    conv = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    backbone.conv1 = conv
    backbone.maxpool = nn.Identity()


# PIL's luminance weights ("L" mode); they sum to 1, so the luminance of images normalised with
# one mean and std for every channel is the normalised luminance.
_LUMA = (0.299, 0.587, 0.114)


def _to_backbone_channels(pixel_values: torch.Tensor, num_channels: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luminance for a one-channel backbone; other inputs unchanged.

    transformers' pipelines hand every image over as RGB and image processors keep three channels,
    so a one-channel encoder takes RGB too and converts it as PIL's convert("L") does."""
    if num_channels == 1 and pixel_values.ndim == 4 and pixel_values.shape[1] == 3:
        weights = pixel_values.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (pixel_values * weights).sum(1, keepdim=True)
    return pixel_values


class BarlowTwinsProjector(nn.Sequential):
    """The projector: (Linear(bias=False), BatchNorm1d, ReLU) for each width but the last, then a
    bare Linear(bias=False), as in the authors' release (so state-dict keys are `{0,3,6}.weight`).

    Input (B, in_features); output (B, projector_dims[-1]).
    """

    def __init__(self, in_features: int, projector_dims: list[int]):
        widths = [in_features, *projector_dims]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(width_in, width_out, bias=False), nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
        super().__init__(*layers)


class BarlowTwinsPreTrainedModel(PreTrainedModel):
    config_class = BarlowTwinsConfig
    config: BarlowTwinsConfig
    base_model_prefix = "barlow_twins"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # A pretraining folder also holds the projector, which the encoder and classifier don't use.
    _keys_to_ignore_on_load_unexpected = [r"projector\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only our heads: the backbone keeps timm's initialisation (transformers' generic one
        # would overwrite it, e.g. ResNet's fan-out conv init and zeroed last BatchNorms).
        if isinstance(module, BarlowTwinsProjector):
            for layer in module:
                if isinstance(layer, nn.Linear):  # nn.Linear's default, which the release uses
                    init.kaiming_uniform_(layer.weight, a=5**0.5)
                elif isinstance(layer, nn.BatchNorm1d):
                    init.ones_(layer.weight)
                    init.zeros_(layer.bias)
                    init.zeros_(layer.running_mean)
                    init.ones_(layer.running_var)
                    init.zeros_(layer.num_batches_tracked)
        elif isinstance(module, nn.Linear) and module is getattr(self, "classifier", None):
            # The linear-evaluation protocol's head: N(0, 0.01), zero bias.
            init.normal_(module.weight, mean=0.0, std=0.01)
            init.zeros_(module.bias)
        elif hasattr(module, "init_non_persistent_buffers"):
            # from_pretrained builds on the meta device; buffers that are not saved must be rebuilt.
            module.init_non_persistent_buffers()

    def save_pretrained(self, save_directory, *args, **kwargs):
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        self.config.auto_map = {**auto_map, **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


class BarlowTwinsModel(BarlowTwinsPreTrainedModel):
    """The encoder: a headless timm backbone.

    Example:
        >>> import torch
        >>> from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel
        >>> model = BarlowTwinsModel(BarlowTwinsConfig(backbone="resnet18", projector_dims=[64])).eval()
        >>> out = model(torch.randn(2, 3, 64, 64))
        >>> out.pooler_output.shape, out.last_hidden_state.shape
        (torch.Size([2, 512]), torch.Size([2, 512, 2, 2]))
    """

    def __init__(self, config: BarlowTwinsConfig):
        super().__init__(config)
        self.backbone = _create_backbone(config)
        self.post_init()

    @property
    def num_features(self) -> int:
        """Width of `pooler_output`."""
        return self.backbone.num_features

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`);
                a one-channel encoder also takes three channels, which it turns into luminance.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state`, timm's `forward_features`
            output ((B, C, H, W) for CNNs, (B, T, C) for ViTs), and `pooler_output`, the
            pre-logits embedding of shape (B, num_features).
        """
        features = self.backbone.forward_features(_to_backbone_channels(pixel_values, self.config.num_channels))
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


class BarlowTwinsForPreTraining(BarlowTwinsPreTrainedModel):
    """Encoder, projector and the Barlow Twins loss.

    Example:
        >>> import torch
        >>> from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining
        >>> config = BarlowTwinsConfig(backbone="resnet18", projector_dims=[128, 128])
        >>> model = BarlowTwinsForPreTraining(config)
        >>> view_1, view_2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
        >>> out = model(view_1, view_2)
        >>> out.loss.backward()
        >>> out.projections.shape
        torch.Size([4, 128])
    """

    def __init__(self, config: BarlowTwinsConfig):
        super().__init__(config)
        self.barlow_twins = BarlowTwinsModel(config)
        self.projector = BarlowTwinsProjector(self.barlow_twins.num_features, config.projector_dims)
        self.post_init()

    def _embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.barlow_twins(pixel_values).pooler_output
        return pooled, self.projector(pooled)

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, pixel_values_2: torch.Tensor | None = None, **kwargs
    ) -> BarlowTwinsForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                the first view.
            pixel_values_2 (`torch.FloatTensor` of the same shape, *optional*): the second view.
                Without it only the projections of the first view are returned, and no loss.
        """
        # Each view passes the network on its own, so BatchNorm statistics are per view, as in
        # the authors' release (concatenating the views would mix their statistics).
        pooled, projections = self._embed(pixel_values)
        projections_2 = loss = None
        if pixel_values_2 is not None:
            _, projections_2 = self._embed(pixel_values_2)
            loss = barlow_twins_loss(
                projections, projections_2, self.config.off_diagonal_weight, self.config.loss_scale
            )
        return BarlowTwinsForPreTrainingOutput(
            loss=None if loss is None else loss.loss,
            on_diagonal_loss=None if loss is None else loss.on_diagonal,
            off_diagonal_loss=None if loss is None else loss.off_diagonal,
            diagonal_mean=None if loss is None else loss.diagonal_mean,
            projections=projections,
            projections_2=projections_2,
            pooler_output=pooled,
        )


class BarlowTwinsForImageClassification(BarlowTwinsPreTrainedModel):
    """Encoder and a linear classifier on `pooler_output`.

    Loads from a pretraining or an encoder folder: only `classifier.*` is new.
    For linear probing call `freeze_backbone()`: the encoder stops learning and stays in eval mode
    (BatchNorm statistics frozen) even under `model.train()`.

    Example:
        >>> import torch
        >>> from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForImageClassification
        >>> config = BarlowTwinsConfig(backbone="resnet18", projector_dims=[64], num_labels=3)
        >>> model = BarlowTwinsForImageClassification(config).freeze_backbone()
        >>> out = model(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 2]))
        >>> out.logits.shape
        torch.Size([2, 3])
    """

    def __init__(self, config: BarlowTwinsConfig):
        super().__init__(config)
        self.barlow_twins = BarlowTwinsModel(config)
        self.classifier = nn.Linear(self.barlow_twins.num_features, config.num_labels)
        self.backbone_frozen = False
        self.post_init()

    def freeze_backbone(self, frozen: bool = True) -> "BarlowTwinsForImageClassification":
        """Stop (or, with `frozen=False`, resume) training the encoder; returns the model."""
        self.backbone_frozen = frozen
        self.barlow_twins.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "BarlowTwinsForImageClassification":
        super().train(mode)
        if self.backbone_frozen:
            self.barlow_twins.eval()
        return self

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices; gives
                a cross-entropy `loss`.

        Returns:
            `ImageClassifierOutput` with `logits` of shape (batch_size, num_labels).
        """
        pooled = self.barlow_twins(pixel_values).pooler_output
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)
