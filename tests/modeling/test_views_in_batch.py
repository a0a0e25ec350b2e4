"""Both views in one forward (issue #32): exactly what two separate forwards give.

The reference is independent of `BarlowTwinsForPreTraining.forward`: a deep copy of the model, its
encoder and projector called once per view, then `barlow_twins_loss`. Compared in float64, after
two training steps (so the second step starts from running statistics the first moved): the
projections, the pooled embedding, the loss, every gradient, every running statistic and
`num_batches_tracked` (two forwards count two batches a step, and so must one).

Tolerance: both sides compute the same sums in float64, but a convolution's or a linear layer's
weight gradient sums over the whole stacked batch at once instead of per view, in another order.
Measured differences stay below 1e-13 of a tensor's largest entry; 1e-10 leaves room for another
CPU's kernels and is still a billion times below what mixing the views' statistics gives (1e-2 to 1).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, barlow_twins_loss
from modeling_barlow.view_batchnorm import PerViewBatchNormForward, views_in_batch


# Tiny networks, tiny images: a second or so each. (spec, image size)
MODELS = {
    "resnet": ({"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 8, 16, 16]}, "projector_dims": [24, 16]}, 32),
    "resnet-small-stem": ({"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 8, 16, 16]},
                           "small_image_stem": True, "projector_dims": [24, 16]}, 16),
    "convnext": ({"backbone": "convnext_atto", "backbone_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
                  "projector_dims": [24, 16]}, 32),
    "vit": ({"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 16,
                                                                     "num_heads": 2}, "projector_dims": [24, 16]}, 32),
}
RELATIVE_TOLERANCE = 1e-10
# A gradient below this share of the model's largest is rounding noise around an exact zero.
NOISE = 1e-12


def build(name: str, momentum: float | None = 0.1) -> BarlowTwinsForPreTraining:
    """The named tiny model in float64, training mode; every BatchNorm with `momentum`."""
    spec, size = MODELS[name]
    torch.manual_seed(0)
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**spec, image_size=size)).double().train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def views(name: str, batch_size: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 views (B, 3, H, W); the second a perturbed copy of the first, as augmentations
    give, but with another mean and spread so that mixing their statistics shows."""
    size = MODELS[name][1]
    generator = torch.Generator().manual_seed(100 + step)
    first = torch.randn(batch_size, 3, size, size, generator=generator, dtype=torch.float64)
    return first, 0.5 + 2.0 * first + 0.3 * torch.randn(first.shape, generator=generator, dtype=torch.float64)


def two_forwards(model: BarlowTwinsForPreTraining, x1: torch.Tensor, x2: torch.Tensor) -> dict:
    """The reference: encoder and projector once per view, then the loss (what the model ran before #32)."""
    pooled = model.barlow_twins(x1).pooler_output
    z1, z2 = model.projector(pooled), model.projector(model.barlow_twins(x2).pooler_output)
    loss = barlow_twins_loss(z1, z2, model.config.off_diagonal_weight, model.config.loss_scale).loss
    return {"loss": loss, "projections": z1, "projections_2": z2, "pooler_output": pooled}


def one_forward(model: BarlowTwinsForPreTraining, x1: torch.Tensor, x2: torch.Tensor) -> dict:
    out = model(x1, x2)
    return {"loss": out.loss, "projections": out.projections, "projections_2": out.projections_2,
            "pooler_output": out.pooler_output}


def assert_exact(got: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = RELATIVE_TOLERANCE) -> None:
    """Equal within `tolerance` of the expected tensor's largest entry (counts: equal)."""
    if not expected.is_floating_point():  # num_batches_tracked: counted, not computed
        assert torch.equal(got, expected), f"{what}: {got} != {expected}"
        return
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(got, expected.detach(), rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"{what}: {m}")


def assert_same_state(model: nn.Module, reference: nn.Module, gradient_tolerance: float = RELATIVE_TOLERANCE,
                      noise: float = NOISE) -> None:
    """Every gradient (within `gradient_tolerance`) and every buffer (running statistics,
    num_batches_tracked) equal, by name."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    largest = max((float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None), default=0.0)
    for name, p in reference.named_parameters():
        assert (grads[name] is None) == (p.grad is None), name
        if p.grad is None:
            continue
        if float(p.grad.abs().max()) <= noise * largest:
            # Zero in exact arithmetic (a bias that a BatchNorm after it takes out again, such as
            # ConvNeXt's head-norm bias before the projector): both sides must be rounding noise.
            assert float(grads[name].abs().max()) <= noise * largest, f"gradient of {name}"
        else:
            assert_exact(grads[name], p.grad, f"gradient of {name}", gradient_tolerance)
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys()
    for name, buffer in reference.named_buffers():
        assert_exact(buffers[name], buffer, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_forward_equals_two_forwards_in_training(name):
    model = build(name)
    reference = copy.deepcopy(model)
    for step in range(2):  # the second step starts from the running statistics the first moved
        x1, x2 = views(name, 6, step)
        got, expected = one_forward(model, x1, x2), two_forwards(reference, x1, x2)
        for key, value in expected.items():
            assert_exact(got[key], value, key)
        got["loss"].backward()
        expected["loss"].backward()
    assert_same_state(model, reference)
    tracked = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert all(int(count) == 4 for count in tracked) and (tracked or name in ("convnext", "vit"))


def test_cumulative_running_averages_weigh_each_view_as_its_own_batch():
    # momentum=None: each update's weight is 1 / num_batches_tracked, so the two views' updates
    # need their own counts (1/1 then 1/2), not one count for both.
    model = build("resnet-small-stem", momentum=None)
    reference = copy.deepcopy(model)
    for step in range(2):
        x1, x2 = views("resnet-small-stem", 5, step)
        one_forward(model, x1, x2)["loss"].backward()
        two_forwards(reference, x1, x2)["loss"].backward()
    assert_same_state(model, reference)


def test_eval_mode_and_hidden_states_equal_two_forwards():
    model = build("resnet")
    x1, x2 = views("resnet", 4)
    model(x1, x2)  # running statistics away from their initial values
    model.eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        out = model(x1, x2, output_hidden_states=True)
        expected = two_forwards(reference, x1, x2)
        for key, value in expected.items():
            assert_exact(getattr(out, key), value, key)
        maps = reference.barlow_twins(x1, output_hidden_states=True).hidden_states
        assert len(out.hidden_states) == len(maps)
        for got_map, expected_map in zip(out.hidden_states, maps):
            assert_exact(got_map, expected_map, "hidden state")
    assert_same_state(model, reference)


def test_views_of_different_sizes_and_gradient_checkpointing_take_two_forwards():
    for setup in ("sizes", "checkpointing"):
        model = build("resnet-small-stem")
        if setup == "checkpointing":
            model.activation_checkpointing_enable()  # transformers >= 5.25, as setup.py requires
        reference = copy.deepcopy(model)
        x1, x2 = views("resnet-small-stem", 4)
        if setup == "sizes":
            x2 = x2[:, :, :12, :12]
        one_forward(model, x1, x2)["loss"].backward()
        two_forwards(reference, x1, x2)["loss"].backward()
        assert_same_state(model, reference)


def test_types_keys_copies_and_pickles_unchanged():
    model = build("resnet")
    plain = nn.Sequential(*[m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
    assert {type(m) for m in plain} == {nn.BatchNorm1d, nn.BatchNorm2d}
    keys = list(model.state_dict())
    x1, x2 = views("resnet", 4)
    model(x1, x2)
    assert list(model.state_dict()) == keys
    assert all(isinstance(m.forward, PerViewBatchNormForward) and m.views_in_batch == 1 for m in plain)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in copied.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(m.forward.layer is m for m in layers)  # each copy normalises with its own tensors
        reference = copy.deepcopy(copied)
        assert_exact(one_forward(copied, x1, x2)["loss"], two_forwards(reference, x1, x2)["loss"], "loss of a copy")


def test_views_in_batch_restores_the_plain_forward_even_on_error():
    model = build("resnet")
    with pytest.raises(ValueError, match="multiple of 2"):
        with views_in_batch(model, 2):
            model.barlow_twins(torch.zeros(3, 3, 32, 32, dtype=torch.float64))
    assert all(m.views_in_batch == 1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_compiles_into_one_graph():
    # The per-view forwards are installed when the model is built, not inside its forward:
    # torch.compile then traces the whole step without a graph break.
    model = build("resnet-small-stem").float()
    x1, x2 = (x.float() for x in views("resnet-small-stem", 4))
    explanation = torch._dynamo.explain(model)(x1, x2)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
