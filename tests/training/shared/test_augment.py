"""Tests for training.shared.augment: both paths against torchvision and against the paper's numbers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.transforms import v2

from training.shared.augment import (
    BARLOW_TWINS_VIEW1,
    BARLOW_TWINS_VIEW2,
    AugmentationDraw,
    BatchedViewAugmentation,
    TwoViewBatchAugmentation,
    TwoViewCropTransform,
    TwoViewTransform,
    ViewAugmentationParams,
    barlow_twins_view_params,
)
from training.shared.augment.cpu import _RandomSigmaBlur

# The paper's table (BYOL augmentations), written out independently of the module: (view 1, view 2).
PAPER_P = {
    "flip": (0.5, 0.5), "jitter": (0.8, 0.8), "grayscale": (0.2, 0.2), "blur": (1.0, 0.1), "solarize": (0.0, 0.2)
}
P_FIELD = {op: f"{op}_p" for op in PAPER_P}  # ViewAugmentationParams' field for each probability
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDENTITY_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
BICUBIC = v2.InterpolationMode.BICUBIC
# tv's uint8 kernels truncate their output and floor the grey mean: up to 1 + 0.35 levels off a float result.
U8_TOL = 1.5 / 255


def china(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.Resampling.BICUBIC)


def make_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    photo = china((48, 36))
    noise = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    return {
        "photo_RGB": photo,
        "photo_L": photo.convert("L"),
        "photo_RGBA": photo.convert("RGBA"),
        "photo_P": photo.convert("P"),
        "noise_RGB": noise,
        "noise_L": Image.fromarray(rng.integers(0, 256, (25, 17), dtype=np.uint8)),
        "noise_RGBA": Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)),
        "noise_P": noise.quantize(16),
    }


def test_paper_parameters_and_kernel_rule():
    v1, v2_ = barlow_twins_view_params()
    assert (v1, v2_) == (BARLOW_TWINS_VIEW1, BARLOW_TWINS_VIEW2)
    for i, p in enumerate((v1, v2_)):
        assert (p.flip_p, p.jitter_p, p.grayscale_p, p.blur_p, p.solarize_p) == tuple(v[i] for v in PAPER_P.values())
        assert p.crop_scale == (0.08, 1.0) and p.blur_sigma == (0.1, 2.0) and p.solarize_threshold == 128
        assert (p.brightness, p.contrast, p.saturation, p.hue) == (0.4, 0.4, 0.2, 0.1)
    assert [v1.blur_kernel_size(s) for s in (224, 96, 64, 32, 28, 8)] == [23, 9, 7, 3, 3, 3]
    with pytest.raises(ValueError):
        ViewAugmentationParams(flip_p=1.5)
    with pytest.raises(ValueError):
        ViewAugmentationParams(hue=0.6)


@pytest.mark.parametrize("name", list(make_images()))
def test_cpu_two_views_any_mode(name):
    image = make_images()[name]
    torch.manual_seed(0)
    a, b = TwoViewTransform(12, MEAN, STD)(image)
    for view in (a, b):
        assert view.shape == (3, 12, 12) and view.dtype == torch.float32 and torch.isfinite(view).all()
    assert not torch.allclose(a, b)
    a1, b1 = TwoViewTransform(12, (0.5,), (0.25,), num_channels=1)(image)
    assert a1.shape == b1.shape == (1, 12, 12) and not torch.allclose(a1, b1)


def no_random_ops(p: ViewAugmentationParams, **changes) -> ViewAugmentationParams:
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **{field: 0.0 for field in P_FIELD.values()})
    return dataclasses.replace(p, **{**base, **changes})


@pytest.mark.parametrize("image_size", [32, 20])
def test_cpu_normalisation_with_random_ops_disabled(image_size):
    image = china((32, 32))
    params = (no_random_ops(BARLOW_TWINS_VIEW1), no_random_ops(BARLOW_TWINS_VIEW2))
    out = TwoViewTransform(image_size, MEAN, STD, view_params=params)(image)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    if image_size != 32:  # only the resize is borrowed from torchvision; 32 -> 32 checks normalisation alone
        raw = TF.resize(raw, [image_size, image_size], interpolation=BICUBIC, antialias=True)
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (MEAN, STD))
    expected = (raw.double() / 255 - mean) / std
    for view in out:
        torch.testing.assert_close(view.double(), expected, atol=1e-5, rtol=0)
    gray = TwoViewTransform(32, (0.5,), (0.2,), num_channels=1, view_params=params)(image)[0]
    expected_l = (torch.from_numpy(np.array(image.convert("L"))).double()[None] / 255 - 0.5) / 0.2
    torch.testing.assert_close(gray.double(), expected_l, atol=1e-5, rtol=0)


def test_crop_transform_returns_uint8_crops_without_flip():
    image = china((24, 24))
    a, b = TwoViewCropTransform(16)(image)
    assert a.shape == b.shape == (3, 16, 16) and a.dtype == b.dtype == torch.uint8
    params = (no_random_ops(BARLOW_TWINS_VIEW1, flip_p=0.5), no_random_ops(BARLOW_TWINS_VIEW2, flip_p=0.5))
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    crop = TwoViewCropTransform(24, view_params=params)
    for _ in range(10):  # the flip belongs to the device path, so full-size crops are the image itself
        assert all(torch.equal(v, raw) for v in crop(image))
    assert TwoViewCropTransform(16, num_channels=1)(image)[0].shape == (1, 16, 16)


def test_cpu_blur_matches_torchvision_gaussian_blur():
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for seed in range(5):  # same seed -> same sigma draw from U[0.1, 2.0] in both
        torch.manual_seed(seed)
        ours = _RandomSigmaBlur(5, (0.1, 2.0))(image)
        torch.manual_seed(seed)
        ref = v2.GaussianBlur(5, (0.1, 2.0))(image)
        assert (ours.int() - ref.int()).abs().max() <= 1


# ------------------------------------------------------------------ device path against torchvision
B = 24


def fixed_draw(**changes) -> AugmentationDraw:
    no = torch.zeros(B, dtype=torch.bool)
    base = dict(
        flip=no, jitter=no, grayscale=no, blur=no, solarize=no, sigma=torch.ones(B),
        jitter_order=torch.arange(4).repeat(B, 1), jitter_factors=torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(B, 1),
    )
    return AugmentationDraw(**{**base, **changes})


def jitter_draw(op: int, value: float) -> AugmentationDraw:
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0])
    factors[op] = value
    order = [op] + [i for i in range(4) if i != op]
    return fixed_draw(
        jitter=torch.ones(B, dtype=torch.bool),
        jitter_factors=factors.repeat(B, 1),
        jitter_order=torch.tensor(order).repeat(B, 1),
    )


ALL = torch.ones(B, dtype=torch.bool)
OP_CASES = {
    "brightness_up": (jitter_draw(0, 1.3), lambda t: TF.adjust_brightness(t, 1.3)),
    "brightness_down": (jitter_draw(0, 0.65), lambda t: TF.adjust_brightness(t, 0.65)),
    "contrast_down": (jitter_draw(1, 0.6), lambda t: TF.adjust_contrast(t, 0.6)),
    "contrast_up": (jitter_draw(1, 1.35), lambda t: TF.adjust_contrast(t, 1.35)),
    "saturation_down": (jitter_draw(2, 0.85), lambda t: TF.adjust_saturation(t, 0.85)),
    "saturation_up": (jitter_draw(2, 1.2), lambda t: TF.adjust_saturation(t, 1.2)),
    "hue_up": (jitter_draw(3, 0.07), lambda t: TF.adjust_hue(t, 0.07)),
    "hue_down": (jitter_draw(3, -0.1), lambda t: TF.adjust_hue(t, -0.1)),
    "grayscale": (fixed_draw(grayscale=ALL), lambda t: TF.rgb_to_grayscale(t, 3)),
    "blur": (fixed_draw(blur=ALL, sigma=torch.full((B,), 1.3)), lambda t: TF.gaussian_blur(t, [3, 3], [1.3, 1.3])),
    "solarize": (fixed_draw(solarize=ALL), lambda t: TF.solarize(t, 128 if t.dtype == torch.uint8 else 128 / 255)),
    "flip": (fixed_draw(flip=ALL), TF.horizontal_flip),
}


@pytest.mark.parametrize("gather_subsets", [True, False])
@pytest.mark.parametrize("case", list(OP_CASES))
def test_batched_op_matches_torchvision(case, gather_subsets):
    draw, ref = OP_CASES[case]
    u8 = torch.randint(0, 256, (B, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    u8[:, :, 0, :4] = torch.tensor([127, 128, 0, 255], dtype=torch.uint8)  # solarize boundary, extremes
    out = BatchedViewAugmentation(BARLOW_TWINS_VIEW2, **IDENTITY_NORM, gather_subsets=gather_subsets).apply(u8, draw)
    assert (out - ref(u8).float() / 255).abs().max() <= U8_TOL  # tv on the same uint8 input
    torch.testing.assert_close(out, ref(u8.float() / 255), atol=1e-5, rtol=0)  # tv on the same data in float


@pytest.mark.parametrize("gather_subsets", [True, False])
@pytest.mark.parametrize(
    "params,all_gray",
    [(BARLOW_TWINS_VIEW1, False), (BARLOW_TWINS_VIEW2, False), (BARLOW_TWINS_VIEW2, True)],
    ids=["view1", "view2", "view2_all_gray"],
)
def test_batched_full_pipeline_matches_per_sample_torchvision(params, all_gray, gather_subsets):
    """Random draw, every op on: each sample equals tv's ops applied one by one in its own jitter order."""
    params = dataclasses.replace(params, jitter_p=0.9, grayscale_p=0.3, blur_p=0.5, solarize_p=0.5)
    module = BatchedViewAugmentation(params, MEAN, STD, gather_subsets=gather_subsets)
    u8 = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    draw = module.sample(32, generator=torch.Generator().manual_seed(3))
    if all_gray:  # a whole-batch op followed by partial ones
        draw = dataclasses.replace(draw, grayscale=torch.ones(32, dtype=torch.bool))
    out = module.apply(u8, draw)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(32):
        t = u8[i].float() / 255
        t = TF.horizontal_flip(t) if draw.flip[i] else t
        if draw.jitter[i]:
            for op in draw.jitter_order[i].tolist():
                t = ops[op](t, draw.jitter_factors[i, op].item())
        t = TF.rgb_to_grayscale(t, 3) if draw.grayscale[i] else t
        t = TF.gaussian_blur(t, [3, 3], [draw.sigma[i].item()] * 2) if draw.blur[i] else t
        t = TF.solarize(t, 128 / 255) if draw.solarize[i] else t
        t = TF.normalize(t, list(MEAN), list(STD))
        torch.testing.assert_close(out[i], t, atol=1e-4, rtol=0)


def test_batched_single_channel_matches_torchvision():
    u8 = torch.randint(0, 256, (B, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    module = BatchedViewAugmentation(BARLOW_TWINS_VIEW2, (0.0,), (1.0,))
    draw = fixed_draw(jitter=ALL, jitter_factors=torch.tensor([1.2, 0.7, 0.5, 0.1]).repeat(B, 1), grayscale=ALL)
    ref = TF.adjust_contrast(TF.adjust_brightness(u8.float() / 255, 1.2), 0.7)  # saturation, hue, grey: no-ops
    torch.testing.assert_close(module.apply(u8, draw), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ distributions: the paper's probabilities
N = 2000


def binomial_ok(rate: float, p: float, n: int) -> bool:
    return abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_batched_draw_rates_and_ranges():
    for i, params in enumerate(barlow_twins_view_params()):
        d = BatchedViewAugmentation(params, MEAN, STD).sample(N, generator=torch.Generator().manual_seed(i))
        for key in PAPER_P:
            mask = getattr(d, key)
            assert binomial_ok(mask.float().mean().item(), PAPER_P[key][i], N), key
        lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
        f = d.jitter_factors
        assert ((f >= lo) & (f <= hi)).all()
        assert ((f.amin(0) - lo).abs() < 0.01).all() and ((f.amax(0) - hi).abs() < 0.01).all()  # bounds reached
        assert ((f.mean(0) - (lo + hi) / 2).abs() <= 5 * (hi - lo) / math.sqrt(12 * N)).all()  # uniform's mean
        assert (d.sigma >= 0.1).all() and (d.sigma <= 2.0).all() and d.sigma.min() < 0.12 and d.sigma.max() > 1.98
        assert abs(d.sigma.mean().item() - 1.05) <= 5 * 1.9 / math.sqrt(12 * N)
        assert torch.equal(d.jitter_order.sort(1).values, torch.arange(4).expand(N, 4))  # permutations
        counts = torch.stack([(d.jitter_order == k).float().mean(0) for k in range(4)])  # op k at position j
        assert all(binomial_ok(c, 0.25, N) for c in counts.flatten().tolist())


def special_input(op: str) -> torch.Tensor:
    """uint8 (3, 8, 8) whose augmentation by op is detectable (see detect)."""
    rng = np.random.default_rng(5)
    if op == "flip":
        x = np.full((3, 8, 8), 30, np.uint8)
        x[:, :, 4:] = 220
    elif op == "blur":
        x = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)[None].repeat(3, 0)
    elif op == "solarize":
        x = rng.integers(150, 251, (3, 8, 8), dtype=np.uint8)
    else:
        x = rng.integers(20, 236, (3, 8, 8), dtype=np.uint8)
    return torch.from_numpy(x)


def detect(op: str, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """(N, 3, 8, 8) outputs in [0, 1] -> (N,) bool: was op applied."""
    if op == "flip":
        return out[..., :4].mean((1, 2, 3)) > out[..., 4:].mean((1, 2, 3))
    if op == "grayscale":
        return (out - out[:, :1]).abs().amax((1, 2, 3)) == 0
    if op == "solarize":
        return out.mean((1, 2, 3)) < 0.5
    return (out - inp.float() / 255).abs().amax((1, 2, 3)) > 0.75 / 255  # jitter, blur: anything changed


def isolated(op: str) -> tuple[ViewAugmentationParams, ViewAugmentationParams]:
    """The module's own views with every other random op off; blur sigma >= 1 so each blur shows in uint8."""
    extra = {"blur_sigma": (1.0, 2.0)} if op == "blur" else {}
    field = P_FIELD[op]
    return tuple(no_random_ops(p, **{field: getattr(p, field)}, **extra) for p in barlow_twins_view_params())


@pytest.mark.parametrize("op", list(PAPER_P))
@pytest.mark.parametrize("path", ["cpu", "batched"])
def test_application_rates_match_paper(path, op):
    inp = special_input(op)
    torch.manual_seed(6)
    if path == "cpu":
        n = 1000  # one call yields both views
        transform = TwoViewTransform(8, **IDENTITY_NORM, view_params=isolated(op))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker; tiny images gain nothing from threads
        try:
            outs = [torch.stack(v) for v in zip(*(transform(inp) for _ in range(n)))]
        finally:
            torch.set_num_threads(threads)
    else:
        n = N
        aug = TwoViewBatchAugmentation(**IDENTITY_NORM, view_params=isolated(op))
        batch = inp.expand(n, -1, -1, -1).contiguous()
        outs = aug(batch, batch, generator=torch.Generator().manual_seed(7))
    for i, out in enumerate(outs):
        rate = detect(op, out, inp).float().mean().item()
        assert binomial_ok(rate, PAPER_P[op][i], n), (path, op, i, rate)


def test_reproducible_with_generator():
    u8 = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    aug = TwoViewBatchAugmentation(MEAN, STD)
    with torch.no_grad():
        a = aug(u8, u8, generator=torch.Generator().manual_seed(0))
        b = aug(u8, u8, generator=torch.Generator().manual_seed(0))
        c = aug(u8, u8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert a[0].shape == (16, 3, 12, 12) and a[0].dtype == torch.float32 and not a[0].requires_grad
    with pytest.raises(ValueError):
        aug(u8.float(), u8.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    u8 = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    module = BatchedViewAugmentation(BARLOW_TWINS_VIEW2, MEAN, STD)
    draw = module.sample(64, generator=torch.Generator().manual_seed(10))
    on_gpu = module.cuda().apply(u8.cuda(), draw.to("cuda")).cpu()
    torch.testing.assert_close(on_gpu, module.cpu().apply(u8, draw), atol=1e-4, rtol=0)
    assert module.cuda()(u8.cuda(), generator=torch.Generator("cuda").manual_seed(0)).device.type == "cuda"


def test_supervised_train_transform_is_a_resize_flip_and_normalisation():
    from training.shared.augment import supervised_train_transform

    image = china((20, 20))  # square: with crop scale 1 the crop is the whole image
    transform = supervised_train_transform(10, MEAN, STD, 3, "bicubic", crop_scale=(1.0, 1.0))
    # Independent computation: torchvision's functional resize, then (x / 255 - mean) / std.
    u8 = TF.resize(TF.pil_to_tensor(image), [10, 10], interpolation=BICUBIC, antialias=True)
    expected = (u8.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.manual_seed(0)
    flips = 0
    n = 200
    for _ in range(n):
        out = transform(image)
        assert out.shape == (3, 10, 10) and out.dtype == torch.float32
        flipped = torch.allclose(out, expected.flip(-1), atol=1e-5)
        assert flipped or torch.allclose(out, expected, atol=1e-5)
        flips += flipped
    assert binomial_ok(flips / n, 0.5, n)


def test_supervised_train_transform_crops_and_converts_modes():
    from training.shared.augment import supervised_train_transform

    torch.manual_seed(0)
    grey = supervised_train_transform(12, (0.5,), (0.25,), num_channels=1)
    outs = [grey(image) for image in (china((40, 30)), china((40, 30)).convert("RGBA"), china((25, 25)).convert("L"))]
    assert all(out.shape == (1, 12, 12) for out in outs)
    # Random crops of one image differ (the default scale is 0.08 to 1 of the area).
    photo = china((48, 36))
    rgb = supervised_train_transform(12, MEAN, STD)
    assert not torch.allclose(rgb(photo), rgb(photo))
    with pytest.raises(ValueError):
        supervised_train_transform(12, MEAN, STD, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError):
        supervised_train_transform(12, (0.5,), (0.5,), num_channels=3)


@pytest.mark.parametrize("height, width", [(28, 28), (256, 341), (427, 160)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.4, 1.0)])
def test_cpu_crop_sampler_matches_torchvision(height, width, scale):
    # The CPU path draws its crop boxes itself (one RNG call instead of torchvision's dozen, which
    # cost ~10% of a 28 px view); the boxes must follow RandomResizedCrop.get_params' distribution.
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    from training.shared.augment.cpu import _crop_box

    image = torch.zeros(1, height, width)
    torch.manual_seed(0)
    ours = torch.tensor([_crop_box(height, width, scale, (3 / 4, 4 / 3)) for _ in range(4000)], dtype=torch.float64)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(4000)],
                          dtype=torch.float64)
    for column, name in enumerate(("top", "left", "height", "width")):
        assert ks_2samp(ours[:, column].numpy(), theirs[:, column].numpy()).pvalue > 1e-3, name
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
