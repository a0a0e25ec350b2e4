"""Tests for training.shared.optim: parameter groups, LARS update, warm-up + cosine schedule.

LARS is checked against a hand-written version of the paper's update (the authors'
``LARS.step`` in facebookresearch/barlowtwins), not against timm's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.shared.optim import (
    create_optimizer,
    create_scheduler,
    split_parameter_groups,
    warmup_steps_from_epochs,
)

ETA = 0.001
MOMENTUM = 0.9


# ----------------------------------------------------------------------------- helpers


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.frozen = nn.Linear(5, 2)
        self.frozen.requires_grad_(False)


class Toy(nn.Module):
    """One 2-d weight and one 1-d bias, float64 so comparisons are tight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())


def paper_step(p, g, mu, lr, wd, adapt):
    """One step of the authors' LARS for one parameter; returns (new p, new mu).

    ``adapt=False`` is their filter for 1-d parameters: no decay, no trust ratio.
    """
    dp = g.clone()
    if adapt:
        dp = dp + wd * p
        p_norm, u_norm = p.norm(), dp.norm()
        q = ETA * p_norm / u_norm if (p_norm > 0 and u_norm > 0) else 1.0
        dp = dp * q
    mu = MOMENTUM * mu + dp  # their buffer starts at zero
    return p - lr * mu, mu


def toy_lars(weight, bias, lr_w, lr_b, wd, eps=None, foreach=None, **options):
    model = Toy(weight, bias)
    opt = create_optimizer(model, "lars", lr_w, lr_b, wd, global_batch_size=256, **options)
    for group in opt.param_groups:
        group["foreach"] = foreach
        if eps is not None:
            group["eps"] = eps
    return model, opt


# Varying the lr per step tells "lr applied at the update" apart from "lr folded into
# the momentum buffer".
LR_FACTORS = [1.0, 0.5, 0.25, 0.8]


# ----------------------------------------------------------------------------- grouping


def test_groups_hold_expected_parameters_by_identity():
    model = ConvNet()
    groups = split_parameter_groups(model, weight_decay=0.1, lr_weights=0.3, lr_biases=0.02)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["weights", "biases"]
    ids = lambda ps: sorted(id(p) for p in ps)  # noqa: E731
    assert ids(by_name["weights"]["params"]) == ids([model.conv.weight, model.fc.weight])
    assert ids(by_name["biases"]["params"]) == ids([model.bn.weight, model.bn.bias, model.fc.bias])
    assert by_name["weights"]["weight_decay"] == 0.1
    assert by_name["biases"]["weight_decay"] == 0.0
    assert by_name["weights"]["peak_lr"] == by_name["weights"]["lr"] == 0.3
    assert by_name["biases"]["peak_lr"] == by_name["biases"]["lr"] == 0.02


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw", "LARS"])
def test_create_optimizer_scales_lr_and_decays_weights_only(name):
    model = ConvNet()
    opt = create_optimizer(model, name, 0.2, 0.0048, 1.5e-6, global_batch_size=1024)
    weights, biases = opt.param_groups
    # 1024 / 256 = 4
    assert weights["lr"] == pytest.approx(0.8) and weights["peak_lr"] == pytest.approx(0.8)
    assert biases["lr"] == pytest.approx(0.0192) and biases["peak_lr"] == pytest.approx(0.0192)
    assert weights["weight_decay"] == 1.5e-6 and biases["weight_decay"] == 0.0
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(weights["params"]) + len(biases["params"]) == n_trainable == 5
    if name.lower() == "lars":
        assert weights["trust_coeff"] == ETA and weights["momentum"] == MOMENTUM
        assert weights["trust_clip"] is False


# ----------------------------------------------------------------------------- LARS


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", ["wd0_random_grad", "parallel_grad"])
def test_lars_matches_paper_exactly_when_denominators_agree(case, foreach):
    # ||g|| + wd||w|| == ||g + wd w|| when wd == 0 or g = c*w with c > 0, so timm's
    # update is the paper's up to timm's eps (a numerical guard the paper lacks, which
    # would shift the ratio by eps/||g||): set eps to 0 and demand float64 agreement.
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b0 = torch.randn(4, generator=gen, dtype=torch.float64)
    wd = 0.0 if case == "wd0_random_grad" else 0.05
    lr_w, lr_b = 0.7, 0.03
    model, opt = toy_lars(w0, b0, lr_w, lr_b, wd, eps=0.0, foreach=foreach)
    ref_w, ref_b = w0.clone(), b0.clone()
    mu_w, mu_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for t, factor in enumerate(LR_FACTORS):
        if case == "parallel_grad":
            # Parallel to the current weight; the update then stays parallel too.
            g_w = (1.0 + t) * model.weight.detach().clone()
            g_w_ref = (1.0 + t) * ref_w
        else:
            g_w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
            g_w_ref = g_w
        g_b = torch.randn(4, generator=gen, dtype=torch.float64)
        model.weight.grad, model.bias.grad = g_w.clone(), g_b.clone()
        for group, peak in zip(opt.param_groups, (lr_w, lr_b)):
            group["lr"] = peak * factor
        opt.step()
        ref_w, mu_w = paper_step(ref_w, g_w_ref, mu_w, lr_w * factor, wd, adapt=True)
        ref_b, mu_b = paper_step(ref_b, g_b, mu_b, lr_b * factor, wd, adapt=False)
        torch.testing.assert_close(model.weight.detach(), ref_w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(model.bias.detach(), ref_b, rtol=1e-12, atol=1e-14)
        buf_w = opt.state[model.weight]["momentum_buffer"]
        torch.testing.assert_close(buf_w, mu_w, rtol=1e-12, atol=1e-14)
    # The trust ratio really acted: without it the weight would have moved ~1/ETA more.
    assert (ref_w - w0).abs().max() < 0.1


@pytest.mark.parametrize("foreach", [False, True])
def test_clipped_lars_caps_the_step_factor_at_the_learning_rate(foreach):
    # LARC's clip mode, written out: the weight's step factor is min(eta ||w|| / ||g||, lr),
    # where plain LARS uses lr * eta ||w|| / ||g|| (wd 0, so every denominator agrees).
    eta = 0.02
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b0 = torch.randn(4, generator=gen, dtype=torch.float64)
    lr_w, lr_b = 0.3, 0.3
    model, opt = toy_lars(w0, b0, lr_w, lr_b, 0.0, eps=0.0, foreach=foreach, trust_coefficient=eta, trust_clip=True)
    ref_w, mu_w = w0.clone(), torch.zeros_like(w0)
    clipped = []
    # Gradient scales chosen so that eta ||w|| / ||g|| lands both above and below lr.
    for t, (factor, grad_scale) in enumerate(zip(LR_FACTORS, [1e-3, 10.0, 1e-3, 10.0])):
        g_w = grad_scale * torch.randn(4, 3, generator=gen, dtype=torch.float64)
        model.weight.grad, model.bias.grad = g_w.clone(), torch.zeros_like(b0)
        for group, peak in zip(opt.param_groups, (lr_w, lr_b)):
            group["lr"] = peak * factor
        opt.step()
        lr = lr_w * factor
        ratio = (eta * ref_w.norm() / g_w.norm()).item()
        clipped.append(ratio > lr)
        mu_w = MOMENTUM * mu_w + g_w * min(ratio / lr, 1.0)
        ref_w = ref_w - lr * mu_w
        torch.testing.assert_close(model.weight.detach(), ref_w, rtol=1e-12, atol=1e-14)
    assert any(clipped) and not all(clipped)  # both regimes were exercised


@pytest.mark.parametrize("wd", [1.5e-6, 0.1])
def test_lars_within_derived_bound_for_general_gradient(wd):
    # From an identical state (p, buf), one step differs only in the trust ratio:
    #   p_timm - p_paper = lr * (q_paper - q_timm) * (g + wd p)
    #                    = lr * q_paper * (1 - D_paper / D_timm) * (g + wd p),
    # with D_paper = ||g + wd p|| <= D_timm = ||g|| + wd||p|| + eps (triangle inequality),
    # i.e. D_timm / D_paper lies in [1, (||g|| + wd||p|| + eps) / ||g + wd p||]. Hence
    # elementwise |diff| <= lr * q_paper * delta * |g + wd p|, delta = 1 - D_paper / D_timm
    # (and the same bound divided by lr for the momentum buffer). For wd = 1.5e-6 and this
    # toy (||p|| ~ ||g|| ~ 3) delta is ~1e-6; wd = 0.1 makes it ~1e-2 so the bound is exercised.
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b0 = torch.randn(4, generator=gen, dtype=torch.float64)
    lr_w, lr_b = 0.5, 0.01
    model, opt = toy_lars(w0, b0, lr_w, lr_b, wd)
    eps = opt.param_groups[0]["eps"]
    max_delta = 0.0
    for t, factor in enumerate(LR_FACTORS):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        model.weight.grad = g.clone()
        model.bias.grad = torch.randn(4, generator=gen, dtype=torch.float64)
        for group, peak in zip(opt.param_groups, (lr_w, lr_b)):
            group["lr"] = peak * factor
        p = model.weight.detach().clone()
        buf = opt.state[model.weight].get("momentum_buffer", torch.zeros_like(p)).clone()
        update = g + wd * p
        d_paper = update.norm()
        delta = float(1 - d_paper / (g.norm() + wd * p.norm() + eps))
        q_paper = ETA * p.norm() / d_paper
        max_delta = max(max_delta, delta)

        opt.step()
        # paper_step assumes mu starts at zero; feed it timm's buffer to test one step.
        ref_p, ref_buf = paper_step(p, g, buf, lr_w * factor, wd, adapt=True)
        # The bound is attained, so allow float64 rounding: relative on the buffer, and a
        # few ulps of |p| ~ 1 on the parameter (still ~1e4 below the wd = 1.5e-6 effect).
        bound_buf = q_paper * delta * update.abs() * (1 + 1e-9) + 1e-16
        bound_p = lr_w * factor * bound_buf + 1e-14
        assert ((opt.state[model.weight]["momentum_buffer"] - ref_buf).abs() <= bound_buf).all()
        assert ((model.weight.detach() - ref_p).abs() <= bound_p).all()
    assert max_delta < (5e-6 if wd < 1e-3 else 0.2)


def test_one_dim_params_get_plain_momentum_sgd():
    # Large wd so that wrongly decaying (or trust-scaling) the bias would be obvious.
    gen = torch.Generator().manual_seed(2)
    b0 = torch.randn(6, generator=gen, dtype=torch.float64)
    model, opt = toy_lars(torch.randn(2, 2, dtype=torch.float64), b0, 0.5, 0.2, wd=0.3)
    p, mu = b0.clone(), torch.zeros_like(b0)
    for factor in LR_FACTORS:
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        model.bias.grad = g.clone()
        opt.param_groups[1]["lr"] = 0.2 * factor
        opt.step()  # weight has no grad: skipped
        mu = MOMENTUM * mu + g
        p = p - 0.2 * factor * mu
        torch.testing.assert_close(model.bias.detach(), p, rtol=1e-12, atol=1e-14)


def test_trust_ratio_is_one_for_zero_weight():
    w0 = torch.zeros(3, 3, dtype=torch.float64)
    model, opt = toy_lars(w0, torch.zeros(3, dtype=torch.float64), 0.5, 0.1, wd=1.5e-6)
    g = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    model.weight.grad = g.clone()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), -0.5 * g, rtol=1e-12, atol=0.0)


# ----------------------------------------------------------------------------- schedule

FINAL = 0.001
T, W = 101, 10  # optimizer steps 0..100, 10 of them warm-up


def paper_multiplier(step: int, total: int = T, warmup: int = W) -> float:
    """The authors' adjust_learning_rate (facebookresearch/barlowtwins, main.py), per unit of peak lr."""
    if step < warmup:
        return step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return q + FINAL * (1 - q)


def test_scheduler_sets_group_lrs_and_survives_state_dict():
    model = ConvNet()
    opt = create_optimizer(model, "lars", 0.2, 0.0048, 1.5e-6, global_batch_size=512)
    peaks = (0.4, 0.0096)  # 512 / 256 = 2
    sched = create_scheduler(opt, total_steps=T, warmup_steps=W)
    seen: dict[int, list[float]] = {}
    for step in range(T):
        seen[step] = [g["lr"] for g in opt.param_groups]  # lr used by this step
        opt.step()  # no grads: a no-op, but keeps the call order warning-free
        sched.step()
        if step == 60:
            state = sched.state_dict()
    for step in range(T):
        assert seen[step] == pytest.approx([p * paper_multiplier(step) for p in peaks], rel=1e-12, abs=1e-15), step
    assert seen[0] == [0.0, 0.0] and seen[W] == pytest.approx(list(peaks))
    # A run with no warm-up starts at the peak, and decays towards 0.001 of it.
    opt3 = create_optimizer(model, "sgd", 0.2, 0.0048, 0.0, global_batch_size=256)
    create_scheduler(opt3, total_steps=5, warmup_steps=0)
    assert [g["lr"] for g in opt3.param_groups] == pytest.approx([0.2, 0.0048])

    # Resume: a fresh optimizer + scheduler loading the step-60 state continue identically.
    opt2 = create_optimizer(model, "lars", 0.2, 0.0048, 1.5e-6, global_batch_size=512)
    sched2 = create_scheduler(opt2, total_steps=T, warmup_steps=W)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(seen[62], rel=1e-12)


def test_warmup_steps_from_epochs():
    assert warmup_steps_from_epochs(10, 37) == 370
    assert warmup_steps_from_epochs(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004
    assert warmup_steps_from_epochs(0, 5) == 0


# ----------------------------------------------------------------------------- errors

FROZEN = nn.Linear(2, 2).requires_grad_(False)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: create_optimizer(ConvNet(), "adam", 0.2, 0.0048, 1e-6, 256), "lars, sgd, adamw"),
        (lambda: create_optimizer(ConvNet(), "lars", 0.2, 0.0048, 1e-6, 0), "global_batch_size"),
        (lambda: create_optimizer(ConvNet(), "lars", 0.2, 0.0048, 1e-6, 256, trust_coefficient=0), "trust_coefficient"),
        (lambda: split_parameter_groups(ConvNet(), -1.0, 0.1, 0.1), "weight_decay"),
        (lambda: split_parameter_groups(FROZEN, 0, 1, 1), "no trainable"),
        (lambda: create_scheduler(torch.optim.SGD(ConvNet().parameters(), lr=1), 0, 0), "total_steps"),
        (lambda: create_scheduler(torch.optim.SGD(ConvNet().parameters(), lr=1), 10, -1), "warmup_steps"),
        (lambda: create_scheduler(torch.optim.SGD(ConvNet().parameters(), lr=1), 10, 2, 1.5), "final_ratio"),
        (lambda: create_scheduler(torch.optim.SGD(ConvNet().parameters(), lr=1), 5, 6), "exceed"),
        (lambda: warmup_steps_from_epochs(-1, 10), "warmup_epochs"),
        (lambda: warmup_steps_from_epochs(1, 0), "steps_per_epoch"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plan_steps_resolves_length_and_warmup():
    from training.shared.optim import plan_steps

    # 1000 examples, 50 per step: 20 steps per epoch. The paper's 10 warm-up epochs by default.
    plan = plan_steps(1000, 50, num_train_epochs=20)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (20, 400, 200)
    assert plan_steps(1000, 50, num_train_epochs=20, warmup_epochs=1).warmup_steps == 20
    assert plan_steps(1000, 50, num_train_epochs=20, warmup_ratio=0.05).warmup_steps == 20  # ceil(0.05 x 400)
    # HF's precedence: steps over ratio over epochs; max_train_steps over epochs.
    assert plan_steps(1000, 50, num_train_epochs=20, warmup_steps=7, warmup_ratio=0.5, warmup_epochs=3).warmup_steps == 7
    limited = plan_steps(1000, 50, num_train_epochs=20, max_train_steps=30)
    assert (limited.total_steps, limited.warmup_steps) == (30, 30)  # 10 epochs of warm-up, capped at the run
    # A stream without a recorded size: 1% of the steps (10 of the paper's 1000 epochs), said so.
    unknown = plan_steps(None, 50, num_train_epochs=20, max_train_steps=300)
    assert (unknown.steps_per_epoch, unknown.total_steps, unknown.warmup_steps) == (None, 300, 3)
    assert "1%" in unknown.warmup_source
    with pytest.raises(ValueError, match="--max_train_steps"):
        plan_steps(None, 50, num_train_epochs=20)
    with pytest.raises(ValueError, match="--warmup_epochs needs the dataset's size"):
        plan_steps(None, 50, num_train_epochs=20, max_train_steps=300, warmup_epochs=2)
    with pytest.raises(ValueError, match="make no full step"):
        plan_steps(40, 50, num_train_epochs=1)
