"""The loss against an independent fp64 implementation of the paper's formula, and its properties."""

from __future__ import annotations

import pytest
import torch

from modeling_barlow import barlow_twins_loss


def reference_loss(z1: torch.Tensor, z2: torch.Tensor, weight: float, scale: float = 1.0, eps: float = 1e-5):
    """The paper's formula written out directly in fp64: BatchNorm1d(affine=False) per view,
    C = a^T b / N, and an explicit mask for the off-diagonal sum."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = a.T @ b / n
    on = ((1 - torch.diagonal(c)) ** 2).sum()
    off = (c[~torch.eye(d, dtype=torch.bool)] ** 2).sum()
    return scale * (on + weight * off), on, off


SHAPES = [(16, 48), (64, 16), (32, 32)]


@pytest.mark.parametrize("path", ["gram", "direct", "auto"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_fp64_reference_value_and_gradient(n, d, path):
    z1 = torch.randn(n, d) * 3 + 1
    z2 = z1 * 0.5 + torch.randn(n, d)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    out = barlow_twins_loss(z1, z2, off_diagonal_weight=0.0051, loss_scale=0.7, path=path)

    r1, r2 = z1.detach().double().requires_grad_(True), z2.detach().double().requires_grad_(True)
    ref, ref_on, ref_off = reference_loss(r1, r2, 0.0051, 0.7)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.on_diagonal.double(), ref_on, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.off_diagonal.double(), ref_off, rtol=1e-5, atol=1e-4)

    grads = torch.autograd.grad(out.loss, (z1, z2))
    ref_grads = torch.autograd.grad(ref, (r1, r2))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["gram", "direct"])
def test_gradient_when_only_one_view_requires_it(path):
    # The one-process Gram path has its own backward; a view without gradient must get none.
    z1, z2 = torch.randn(16, 48), torch.randn(16, 48).requires_grad_(True)
    (grad,) = torch.autograd.grad(barlow_twins_loss(z1, z2, path=path).loss, (z2,))
    r2 = z2.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(reference_loss(z1, r2, 0.0051)[0], (r2,))
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)
    assert z1.grad is None


def test_gram_and_direct_paths_agree_at_paper_width():
    z1, z2 = torch.randn(64, 2048, requires_grad=True), torch.randn(64, 2048, requires_grad=True)
    gram = barlow_twins_loss(z1, z2, path="gram")
    direct = barlow_twins_loss(z1, z2, path="direct")
    torch.testing.assert_close(gram.loss, direct.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(gram.off_diagonal, direct.off_diagonal, rtol=1e-5, atol=0)
    for g, d in zip(torch.autograd.grad(gram.loss, (z1, z2)), torch.autograd.grad(direct.loss, (z1, z2))):
        torch.testing.assert_close(g, d, rtol=1e-4, atol=1e-7)


def test_invariant_to_per_dimension_affine_maps_of_each_view():
    z1, z2 = torch.randn(40, 24), torch.randn(40, 24)
    base = barlow_twins_loss(z1, z2).loss
    # A different positive scale and shift per dimension, and per view.
    moved = barlow_twins_loss(
        z1 * (torch.rand(24) * 3 + 0.5) + torch.randn(24) * 10,
        z2 * (torch.rand(24) * 3 + 0.5) - torch.randn(24) * 10,
    ).loss
    torch.testing.assert_close(moved, base, rtol=1e-4, atol=0)


def test_invariant_to_permuting_the_batch():
    z1, z2 = torch.randn(40, 24), torch.randn(40, 24)
    order = torch.randperm(40)
    torch.testing.assert_close(barlow_twins_loss(z1[order], z2[order]).loss, barlow_twins_loss(z1, z2).loss)


def test_not_invariant_to_pairing_the_views_differently():
    # Guards the invariance tests above: a loss that ignored the pairing would pass them too.
    z1 = torch.randn(40, 24)
    z2 = z1 + 0.1 * torch.randn(40, 24)
    paired = barlow_twins_loss(z1, z2).loss
    shuffled = barlow_twins_loss(z1, z2[torch.randperm(40)]).loss
    assert shuffled > 10 * paired


@pytest.mark.parametrize("path", ["gram", "direct"])
def test_zero_when_cross_correlation_is_identity(path):
    n, d = 64, 16
    x = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal, zero-mean columns
    a = q * n**0.5  # unit variance and uncorrelated dimensions: C = I
    z = (a * 1000 + 5).float()  # a large scale makes BatchNorm's eps negligible
    out = barlow_twins_loss(z, z.clone(), path=path)
    assert out.on_diagonal.item() < 1e-9
    assert abs(out.off_diagonal.item()) < 1e-4
    assert abs(out.loss.item()) < 1e-6


def test_fp32_under_bf16_autocast():
    z1, z2 = torch.randn(32, 64), torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected_1 = torch.nn.functional.linear(z1, torch.eye(64))  # bf16 under autocast
        projected_2 = torch.nn.functional.linear(z2, torch.eye(64))
        assert projected_1.dtype == torch.bfloat16
        out = barlow_twins_loss(projected_1, projected_2)
    assert out.loss.dtype == out.on_diagonal.dtype == out.off_diagonal.dtype == torch.float32
    ref, _, _ = reference_loss(projected_1.float(), projected_2.float(), 0.0051)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_loss_combines_terms_with_weight_and_scale():
    z1, z2 = torch.randn(20, 30), torch.randn(20, 30)
    out = barlow_twins_loss(z1, z2, off_diagonal_weight=0.02, loss_scale=3.0)
    torch.testing.assert_close(out.loss, 3.0 * (out.on_diagonal + 0.02 * out.off_diagonal))


def test_batch_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="at least two"):
        barlow_twins_loss(torch.randn(1, 8), torch.randn(1, 8))


@pytest.mark.parametrize("shapes", [((4, 8), (4, 9)), ((4, 8), (5, 8)), ((4,), (4,))])
def test_mismatched_shapes_are_a_clear_error(shapes):
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(torch.randn(*shapes[0]), torch.randn(*shapes[1]))


@pytest.mark.parametrize("path", ["gram", "direct"])
def test_diagonal_mean_is_the_mean_of_c_ii(path):
    # The number logged beside the loss, which reads the same at any width: against C written out.
    z1 = torch.randn(24, 40) * 2 + 1
    z2 = 0.7 * z1 + torch.randn(24, 40)
    out = barlow_twins_loss(z1, z2, path=path)
    a = (z1.double() - z1.double().mean(0)) / torch.sqrt(z1.double().var(0, unbiased=False) + 1e-5)
    b = (z2.double() - z2.double().mean(0)) / torch.sqrt(z2.double().var(0, unbiased=False) + 1e-5)
    c = a.T @ b / 24
    assert out.diagonal_mean.item() == pytest.approx(torch.diagonal(c).mean().item(), rel=1e-5)
    assert 0.3 < out.diagonal_mean.item() < 1  # correlated views
    assert not out.diagonal_mean.requires_grad


@pytest.fixture
def multi_process_code_on_one_process(tmp_path, monkeypatch):
    """The multi-process code (global statistics, gathered rows, C summed over processes) run by a
    one-process gloo group with is_distributed() answering yes: it must give the one-process loss.
    (tests/modeling/test_loss_distributed.py runs it on two processes, in subprocesses that mutation
    testing cannot follow; this runs in process.)"""
    import torch.distributed as dist

    import modeling_barlow.distributed as distributed
    import modeling_barlow.loss as loss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    monkeypatch.setattr(loss, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_the_multi_process_code_matches_the_reference(multi_process_code_on_one_process, path):
    from modeling_barlow import cross_correlation

    # A small spread, so that eps = 0.5 matters (it is added to variances of about 0.1).
    z1 = (torch.randn(16, 24) * 0.3 + 1).requires_grad_(True)
    z2 = (z1.detach() * 0.5 + torch.randn(16, 24) * 0.3).requires_grad_(True)
    out = barlow_twins_loss(z1, z2, off_diagonal_weight=0.0051, loss_scale=0.7, eps=0.5, path=path)
    r1, r2 = z1.detach().double().requires_grad_(True), z2.detach().double().requires_grad_(True)
    ref, ref_on, ref_off = reference_loss(r1, r2, 0.0051, 0.7, eps=0.5)
    torch.testing.assert_close(out.on_diagonal.double(), ref_on, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.off_diagonal.double(), ref_off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.loss, (z1, z2)), torch.autograd.grad(ref, (r1, r2))):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    a = (r1.detach() - r1.detach().mean(0)) / torch.sqrt(r1.detach().var(0, unbiased=False) + 0.5)
    b = (r2.detach() - r2.detach().mean(0)) / torch.sqrt(r2.detach().var(0, unbiased=False) + 0.5)
    torch.testing.assert_close(cross_correlation(z1, z2, eps=0.5).double(), a.T @ b / 16, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["gram", "direct"])
def test_eps_is_added_to_the_variance(path):
    z1, z2 = torch.randn(16, 24) * 0.3, torch.randn(16, 24) * 0.3
    out = barlow_twins_loss(z1, z2, eps=0.5, path=path)
    ref, _, _ = reference_loss(z1, z2, 0.0051, eps=0.5)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert abs(out.loss.item() - reference_loss(z1, z2, 0.0051)[0].item()) > 1  # eps changes it here


@pytest.mark.parametrize("path, n, d, used", [
    ("auto", 8, 9, "gram"), ("auto", 9, 9, "direct"), ("auto", 10, 9, "direct"),
    ("gram", 20, 4, "gram"), ("direct", 4, 20, "direct"),
])
def test_the_gram_path_is_taken_when_asked_or_when_the_batch_is_narrower_than_d(monkeypatch, path, n, d, used):
    import modeling_barlow.loss as loss

    taken = []
    for name in ("_sums_gram", "_sums_direct"):
        real = getattr(loss, name)
        monkeypatch.setattr(loss, name, lambda *args, real=real, name=name: taken.append(name) or real(*args))
    barlow_twins_loss(torch.randn(n, d), torch.randn(n, d), path=path)
    assert taken == [f"_sums_{used}"]


def test_two_samples_are_enough_and_an_unknown_path_is_named():
    assert torch.isfinite(barlow_twins_loss(torch.randn(2, 4), torch.randn(2, 4)).loss)
    with pytest.raises(ValueError, match="^path must be 'auto', 'gram' or 'direct', got 'fast'.$"):
        barlow_twins_loss(torch.randn(4, 4), torch.randn(4, 4), path="fast")


def test_the_off_diagonal_sum_keeps_its_precision_when_c_is_the_identity_at_width_1024():
    # ||C||_F^2 (about 1024) and sum(diag(C)^2) nearly cancel: accumulated in fp32, their difference
    # would be off by about 1e-4; in fp64 it is the fp32 rounding of C's entries, about 1e-8.
    n, d = 2048, 1024
    x = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    z = (q * n**0.5 * 1000).float()
    out = barlow_twins_loss(z, z.clone(), path="direct")
    assert abs(out.off_diagonal.item()) < 1e-6
