"""`image_classification_loss` and `infer_problem_type` called directly (no model), each loss
checked against its formula written out here: cross-entropy as logsumexp minus the true class's
logit, binary cross-entropy from the sigmoid, mean squared error. Fast enough for mutation testing
(benchmarks/mutation.py); test_model_contract.py compares the same losses with transformers' own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modeling_barlow.classification_loss import PROBLEM_TYPES, image_classification_loss, infer_problem_type


def _config(problem_type=None):
    return SimpleNamespace(problem_type=problem_type)


def _cross_entropy(logits, labels):
    kept = labels != -100
    logits, labels = logits[kept].double(), labels[kept]
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean().float()


def _binary_cross_entropy(logits, targets):
    p, y = torch.sigmoid(logits.double()), targets.double()
    return (-(y * torch.log(p) + (1 - y) * torch.log(1 - p))).mean().float()


def test_problem_types():
    assert PROBLEM_TYPES == ("regression", "single_label_classification", "multi_label_classification")


@pytest.mark.parametrize("num_labels,dtype,expected", [
    (1, torch.long, "regression"), (1, torch.float32, "regression"),
    (3, torch.long, "single_label_classification"), (3, torch.int32, "single_label_classification"),
    (3, torch.float32, "multi_label_classification"), (3, torch.bool, "multi_label_classification"),
    (3, torch.int16, "multi_label_classification"), (2, torch.long, "single_label_classification"),
])
def test_inferred_problem_type_follows_transformers_rule(num_labels, dtype, expected):
    assert infer_problem_type(num_labels, torch.zeros(2, dtype=dtype)) == expected


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_single_label_is_cross_entropy_ignoring_minus_100(dtype):
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.tensor([0, 3, -100, 1, 2], dtype=dtype)
    config = _config()
    loss = image_classification_loss(logits, labels, config)
    assert config.problem_type == "single_label_classification"
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, _cross_entropy(logits, labels.long()))


def test_multi_label_is_binary_cross_entropy_of_the_sigmoid():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)) * 2
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]])
    for labels in (targets.float(), targets.bool(), targets):
        config = _config("multi_label_classification")
        loss = image_classification_loss(logits, labels, config)
        torch.testing.assert_close(loss, _binary_cross_entropy(logits, targets))
    config = _config()
    torch.testing.assert_close(image_classification_loss(logits, targets.float(), config), _binary_cross_entropy(logits, targets))
    assert config.problem_type == "multi_label_classification"


@pytest.mark.parametrize("shape", [(4,), (4, 1)])
def test_regression_with_one_output_is_mean_squared_error(shape):
    logits = torch.randn(4, 1, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1.0, -2.0, 0.5, 3.0])
    config = _config()
    loss = image_classification_loss(logits, targets.reshape(shape), config)
    assert config.problem_type == "regression"
    torch.testing.assert_close(loss, ((logits[:, 0] - targets) ** 2).mean())
    # Integer targets are numbers.
    ints = torch.tensor([1, -2, 0, 3])
    torch.testing.assert_close(image_classification_loss(logits, ints.reshape(shape), _config("regression")),
                               ((logits[:, 0] - ints.float()) ** 2).mean())


def test_regression_with_several_outputs_is_mean_squared_error():
    logits = torch.randn(3, 2, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1.0, 2.0], [0.0, -1.0], [4.0, 0.5]])
    loss = image_classification_loss(logits, targets, _config("regression"))
    torch.testing.assert_close(loss, ((logits - targets) ** 2).mean())


def test_loss_is_float32_for_half_logits():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(4)).half()
    labels = torch.tensor([0, 1, 2, 1])
    loss = image_classification_loss(logits, labels, _config())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _cross_entropy(logits.float(), labels))


def test_a_set_problem_type_is_used_not_inferred():
    logits = torch.randn(2, 3)
    config = _config("regression")
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])  # integer: inference would say single-label
    torch.testing.assert_close(image_classification_loss(logits, labels, config), ((logits - labels.float()) ** 2).mean())
    assert config.problem_type == "regression"


def test_unknown_problem_type_is_refused():
    with pytest.raises(ValueError) as error:
        image_classification_loss(torch.randn(2, 3), torch.tensor([0, 1]), _config("ranking"))
    assert str(error.value) == ("problem_type='ranking' is not one of regression, single_label_classification, "
                                "multi_label_classification.")


# (num_labels, problem_type or None, labels, the whole message)
REFUSED = [
    (3, "single_label_classification", torch.tensor([0.0, 2.0]),
     "problem_type='single_label_classification' needs integer class ids, got float32 labels. Pass class ids as "
     "integers; for one 0/1 target per class use 'multi_label_classification', for numbers 'regression'."),
    (3, "single_label_classification", torch.tensor([True, False]),
     "problem_type='single_label_classification' needs integer class ids, got bool labels. Pass class ids as "
     "integers; for one 0/1 target per class use 'multi_label_classification', for numbers 'regression'."),
    (3, "single_label_classification", torch.tensor([0j, 1j]),
     "problem_type='single_label_classification' needs integer class ids, got complex64 labels. Pass class ids as "
     "integers; for one 0/1 target per class use 'multi_label_classification', for numbers 'regression'."),
    (3, "single_label_classification", torch.tensor([[0, 1, 0], [1, 0, 0]]),
     "problem_type='single_label_classification' needs one class id per image, shape (2,); got labels of shape (2, 3)."),
    (3, None, torch.tensor([0, 1, 2]),
     "problem_type was inferred as 'single_label_classification' from num_labels=3 and int64 labels needs one class "
     "id per image, shape (2,); got labels of shape (3,)."),
    (3, "multi_label_classification", torch.tensor([0, 2]),
     "problem_type='multi_label_classification' needs one 0/1 target per class, shape (2, 3); got labels of shape "
     "(2,). For one class id per image pass integer labels (or set problem_type='single_label_classification')."),
    (3, None, torch.tensor([0.0, 2.0]),
     "problem_type was inferred as 'multi_label_classification' from num_labels=3 and float32 labels needs one 0/1 "
     "target per class, shape (2, 3); got labels of shape (2,). For one class id per image pass integer labels (or "
     "set problem_type='single_label_classification')."),
    (1, "regression", torch.tensor([True, False]), "problem_type='regression' needs numeric targets, got bool labels."),
    (1, "regression", torch.tensor([1j, 0j]), "problem_type='regression' needs numeric targets, got complex64 labels."),
    (1, "regression", torch.tensor([[0.5, 1.0], [1.0, 2.0]]),
     "problem_type='regression' with one output needs one target per image, shape (2,); got (2, 2)."),
    (3, "regression", torch.tensor([0.5, 1.0]), "problem_type='regression' needs targets of shape (2, 3); got (2,)."),
]


@pytest.mark.parametrize("num_labels,problem_type,labels,message", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_labels_that_do_not_fit_are_refused_with_the_whole_reason(num_labels, problem_type, labels, message):
    config = _config(problem_type)
    with pytest.raises(ValueError) as error:
        image_classification_loss(torch.randn(2, num_labels), labels, config)
    assert str(error.value) == message
    assert config.problem_type == problem_type  # a failed inference is not recorded


@pytest.mark.parametrize("problem_type,labels", [
    ("single_label_classification", torch.tensor([0, 1, 2, 1])),
    ("multi_label_classification", torch.zeros(4, 3)),
    ("regression", torch.zeros(4, 3)),
])
def test_labels_move_to_the_logits_device(problem_type, labels):
    # Logits on another device than the labels (the meta device stands in for an accelerator here):
    # torch's losses refuse tensors on two devices, so the labels must follow the logits.
    loss = image_classification_loss(torch.randn(4, 3, device="meta"), labels, _config(problem_type))
    assert loss.device.type == "meta"
