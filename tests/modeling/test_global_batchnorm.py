"""GlobalBatchNorm on one process is BatchNorm, and conversion keeps the tensors; cross_correlation."""

from __future__ import annotations

import copy

import timm
import torch
from torch import nn

from modeling_barlow import GlobalBatchNorm, convert_to_global_batchnorm, cross_correlation


def test_conversion_keeps_tensors_keys_and_outputs():
    model = timm.create_model("resnet18", num_classes=0, channels=[8, 16, 16, 16])
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted = convert_to_global_batchnorm(model)
    assert list(converted.state_dict()) == keys
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    assert batchnorms > 0 and sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == batchnorms
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(converted.train()(x), reference.train()(x))
    for name, buffer in reference.named_buffers():  # running statistics moved identically
        torch.testing.assert_close(dict(converted.named_buffers())[name], buffer)
    torch.testing.assert_close(converted.eval()(x), reference.eval()(x))


def test_cross_correlation_matches_direct_formula():
    z1, z2 = torch.randn(50, 6) * 4 + 2, torch.randn(50, 6)
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    torch.testing.assert_close(cross_correlation(z1, z2), a.T @ b / 50, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(cross_correlation(z1, z1)), torch.ones(6), rtol=1e-4, atol=1e-5)
