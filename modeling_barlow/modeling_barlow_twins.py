"""Barlow Twins (Zbontar et al., ICML 2021) on any timm backbone, as transformers models.

Every head shares one encoder, `BarlowTwinsModel`, stored under `barlow_twins.` so weights move
between them with `from_pretrained`:

* `BarlowTwinsForPreTraining`: encoder, projector and the twin loss.
* `BarlowTwinsForImageClassification`: encoder and a linear classifier (fine-tuning, probing).
* `BarlowTwinsBackbone`: the encoder's stage feature maps, for transformers' dense heads
  (`AutoBackbone`: DETR, UperNet, Mask2Former, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    ModelOutput,
)
from transformers.utils import can_return_tuple

from .classification_loss import image_classification_loss
from .configuration_barlow_twins import BarlowTwinsConfig
from .loss import barlow_twins_loss
from .timm_network import (
    create_timm_network,
    forward_stages,
    initialise_missing_like_timm,
    mark_drawn_by_timm,
    stage_feature_maps,
    was_drawn_by_timm_just_now,
)
from .view_batchnorm import enable_views_in_batch, views_in_batch


__all__ = [
    "BarlowTwinsBackbone",
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
    "AutoBackbone": "modeling_barlow_twins.BarlowTwinsBackbone",
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
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states`, the
            first view's stage feature maps (see [`BarlowTwinsModel.forward`]).
    """

    loss: torch.FloatTensor | None = None
    on_diagonal_loss: torch.FloatTensor | None = None
    off_diagonal_loss: torch.FloatTensor | None = None
    diagonal_mean: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    projections_2: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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


def init_linear_evaluation_head(head: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """The linear-evaluation protocol's head, as the authors initialise it: weights N(0, 0.01), zero
    bias. The classifier's `_init_weights` and the training probes both use this one definition."""
    with torch.no_grad():
        init.normal_(head.weight, mean=0.0, std=0.01, generator=generator)
        init.zeros_(head.bias)
    return head


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
    # Through timm's own set_grad_checkpointing (ResNet, ConvNeXt, ViT, ... recompute per block).
    supports_gradient_checkpointing = True
    # A pretraining folder also holds the projector, which the encoder and classifier don't use.
    _keys_to_ignore_on_load_unexpected = [r"projector\."]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers' shortcut for remote code marks a module initialised when every tensor of its
        # own is loaded, so it skipped modules that hold none of their own: the projector and the timm
        # network's root, whose init here covers their children (BatchNorm buffers, timm's convs,
        # ...). It exists for remote code that writes tensors directly; every write below goes
        # through transformers.initialization or initialise_missing_like_timm, which leave what a
        # checkpoint loaded (`_is_hf_initialized`) alone, so it is not needed.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(self, BarlowTwinsModel) and module is self.backbone:
            # The timm network as a whole, the way timm initialises it (fan-out convs, zeroed last
            # BatchNorms, ViT's truncated normals, ...); transformers' generic init would differ.
            # A network timm has just built in __init__ keeps its values unless the random state was
            # reseeded since: then it is drawn again, so that a model built here and one built on the
            # meta device and initialised afterwards get the same values from the same state.
            if not was_drawn_by_timm_just_now(module):
                initialise_missing_like_timm(module, self.config)
        elif isinstance(module, BarlowTwinsProjector):
            for layer in module:
                if isinstance(layer, nn.Linear):  # nn.Linear's default, which the release uses
                    init.kaiming_uniform_(layer.weight, a=5**0.5)
                elif isinstance(layer, nn.BatchNorm1d):  # BatchNorm's reset_parameters and reset_running_stats
                    init.ones_(layer.weight)
                    init.zeros_(layer.bias)
                    init.zeros_(layer.running_mean)
                    init.ones_(layer.running_var)
                    init.zeros_(layer.num_batches_tracked)
        elif isinstance(module, nn.Linear) and module is getattr(self, "classifier", None):
            init_linear_evaluation_head(module)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        # timm checkpoints its own blocks (its checkpoint_seq, non-reentrant); transformers' function
        # and every_n_layers do not apply.
        encoders = [m for m in self.modules() if isinstance(m, BarlowTwinsModel)]
        for encoder in encoders:
            if not hasattr(encoder.backbone, "set_grad_checkpointing"):
                raise ValueError(f"timm's {type(encoder.backbone).__name__} does not support gradient checkpointing.")
            encoder.backbone.set_grad_checkpointing(enable)
            encoder.gradient_checkpointing = enable

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
        >>> out = model(torch.randn(2, 3, 64, 64), output_hidden_states=True)
        >>> out.pooler_output.shape, out.last_hidden_state.shape
        (torch.Size([2, 512]), torch.Size([2, 512, 2, 2]))
        >>> [tuple(h.shape[1:]) for h in out.hidden_states]
        [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    """

    def __init__(self, config: BarlowTwinsConfig):
        super().__init__(config)
        self.backbone = create_timm_network(config)
        self.gradient_checkpointing = False
        mark_drawn_by_timm(self.backbone)  # see _init_weights
        self.post_init()

    @property
    def num_features(self) -> int:
        """Width of `pooler_output`."""
        return self.backbone.num_features

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`);
                a one-channel encoder also takes three channels, which it turns into luminance.
            output_hidden_states (`bool`, *optional*): also return every stage's feature map
                (default: `config.output_hidden_states`).

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state`, timm's `forward_features`
            output ((B, C, H, W) for CNNs, (B, T, C) for ViTs), `pooler_output`, the pre-logits
            embedding of shape (B, num_features), and with `output_hidden_states` `hidden_states`:
            one (B, C_i, H_i, W_i) map per stage of `config.stage_names`, as timm's
            `forward_intermediates` gives them (ResNet: the stem, before its max-pool, then each
            layer, like transformers' ResNetModel; ViT: each block's patch tokens as a map).
        """
        pixel_values = _to_backbone_channels(pixel_values, self.config.num_channels)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = None
        if output_hidden_states:
            features, maps = forward_stages(self.backbone, pixel_values)
            hidden_states = tuple(maps)
        else:
            features = self.backbone.forward_features(pixel_values)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled, hidden_states=hidden_states)


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
        # Both views in one forward, each with its own BatchNorm statistics (see forward).
        enable_views_in_batch(self)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_2: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BarlowTwinsForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                the first view.
            pixel_values_2 (`torch.FloatTensor` of the same shape, *optional*): the second view.
                Without it only the projections of the first view are returned, and no loss.

        Two views of the same shape pass the encoder and the projector once, stacked along the batch
        (2B, C, H, W), with every BatchNorm normalising each view by that view's own statistics and
        updating its running statistics once per view, in order (`views_in_batch`): the result, the
        gradients and the running statistics are those of one forward per view, as in the authors'
        release (a plain concatenation would mix the views' statistics), at the speed of one forward.
        Under several processes each `GlobalBatchNorm` carries both views' statistics in one
        collective. Dropout and drop-path (off by default) then draw one mask for the stacked batch,
        not one per view. Views of different shapes, and gradient checkpointing (timm recomputes its
        blocks in the backward, outside this forward), take one forward per view.
        """
        projections_2 = loss = None
        if pixel_values_2 is None:
            encoded = self.barlow_twins(pixel_values, output_hidden_states=output_hidden_states)
            pooled = encoded.pooler_output
            projections = self.projector(pooled)
            hidden_states = encoded.hidden_states
        elif pixel_values_2.shape == pixel_values.shape and not self.barlow_twins.gradient_checkpointing:
            batch_size = pixel_values.shape[0]
            with views_in_batch(self, num_views=2):
                encoded = self.barlow_twins(
                    torch.cat([pixel_values, pixel_values_2]), output_hidden_states=output_hidden_states
                )
                projections, projections_2 = self.projector(encoded.pooler_output).unflatten(0, (2, -1)).unbind()
            pooled = encoded.pooler_output[:batch_size]
            hidden_states = None if encoded.hidden_states is None else tuple(h[:batch_size] for h in encoded.hidden_states)
        else:
            encoded = self.barlow_twins(pixel_values, output_hidden_states=output_hidden_states)
            pooled, hidden_states = encoded.pooler_output, encoded.hidden_states
            projections = self.projector(pooled)
            projections_2 = self.projector(self.barlow_twins(pixel_values_2).pooler_output)
        if projections_2 is not None:
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
            hidden_states=hidden_states,
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
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            labels (`torch.Tensor`, *optional*): gives a `loss` chosen by `config.problem_type`, as in
                transformers' classifiers: class ids (B,) for cross-entropy, (B, num_labels) 0/1
                targets for multi-label binary cross-entropy, numbers for regression (MSE). Unset, it
                is inferred: one label is regression, integer labels are class ids, others multi-label.
            output_hidden_states (`bool`, *optional*): also return the encoder's stage feature maps.

        Returns:
            `ImageClassifierOutput` with `logits` of shape (batch_size, num_labels).
        """
        encoded = self.barlow_twins(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(encoded.pooler_output)
        loss = None
        if labels is not None:
            loss = image_classification_loss(logits, labels, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states)


class BarlowTwinsBackbone(BackboneMixin, BarlowTwinsPreTrainedModel):
    """The encoder as a transformers backbone: the feature maps of the stages in
    `config.out_features` (or `out_indices`), for dense heads (DETR, UperNet, Mask2Former, ...).

    Stages are timm's `feature_info` (`config.stage_names`); `channels` lists the widths of the
    returned maps. A ViT returns each chosen block's patch tokens as a (B, C, H/patch, W/patch) map.
    Loads from a pretraining, encoder or classifier folder: `AutoBackbone.from_pretrained(folder,
    out_indices=[1, 2, 3, 4])`.

    Example:
        >>> import torch
        >>> from modeling_barlow import BarlowTwinsBackbone, BarlowTwinsConfig
        >>> config = BarlowTwinsConfig(backbone="resnet18", projector_dims=[64], out_indices=[2, 3, 4])
        >>> backbone = BarlowTwinsBackbone(config).eval()
        >>> backbone.channels
        [128, 256, 512]
        >>> [tuple(m.shape) for m in backbone(torch.randn(1, 3, 64, 64)).feature_maps]
        [(1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    """

    has_attentions = False
    _keys_to_ignore_on_load_unexpected = [r"projector\.", r"classifier\."]

    def __init__(self, config: BarlowTwinsConfig):
        super().__init__(config)
        self.barlow_twins = BarlowTwinsModel(config)
        network = self.barlow_twins.backbone
        self.num_features = [int(info["num_chs"]) for info in network.feature_info]
        if config.out_features is None:  # transformers' default: the last stage
            config.set_output_features_output_indices(out_features=None, out_indices=None)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            output_hidden_states (`bool`, *optional*): also return every stage's map.

        Returns:
            `BackboneOutput` with `feature_maps`, one (B, C_i, H_i, W_i) map per stage in
            `out_features`, in order.
        """
        if output_attentions:
            raise ValueError("BarlowTwinsBackbone has no attention maps to return (output_attentions=True).")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        wanted = [self.stage_names.index(name) for name in self.out_features]
        network = self.barlow_twins.backbone
        pixel_values = _to_backbone_channels(pixel_values, self.config.num_channels)
        if output_hidden_states:
            _, maps = forward_stages(network, pixel_values)
            return BackboneOutput(feature_maps=tuple(maps[i] for i in wanted), hidden_states=tuple(maps))
        # Only what is asked for: timm stops after the last wanted stage.
        maps = stage_feature_maps(network, pixel_values, wanted)
        return BackboneOutput(feature_maps=tuple(maps))
