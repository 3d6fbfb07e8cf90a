"""Uncertain-label policies on a hand-made batch and the (batch-adaptive) multi-label BCE."""
import math

import pytest
import torch

from medvlp.finetune.pcam.loss import apply_uncertain, check_policies, multilabel_bce

# 4 images x 3 findings; column 0 has one uncertain, column 1 two, column 2 none.
LABELS = torch.tensor([[1., -1., 0.],
                       [-1., 0., 1.],
                       [0., -1., 0.],
                       [0., 1., 1.]])


def test_each_policy_on_a_hand_made_batch():
    t, m = apply_uncertain(LABELS, ["ignore", "zeros", "ones"])
    assert t.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]]
    assert m.tolist() == [[True] * 3, [False, True, True], [True] * 3, [True] * 3]
    t, m = apply_uncertain(LABELS, ["ones", "ones", "ignore"])
    assert t.tolist() == [[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert m.all()
    t, m = apply_uncertain(LABELS, ["zeros", "ignore", "zeros"])
    assert t.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]]
    assert m[:, 1].tolist() == [False, True, False, True] and m[:, [0, 2]].all()


def _bce(z, y, w=1.0):
    return -(w * y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))


def test_bce_counts_only_the_counted_samples_and_sums_findings():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4], [-0.7, 0.9, 0.1], [0.0, -2.0, 1.2]])
    t, m = apply_uncertain(LABELS, ["ignore", "ignore", "zeros"])
    loss, per = multilabel_bce(logits, t, m)
    ref = []
    for k in range(3):
        vals = [_bce(logits[b, k].item(), t[b, k].item()) for b in range(4) if m[b, k]]
        ref.append(sum(vals) / len(vals))
    torch.testing.assert_close(per, torch.tensor(ref), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, torch.tensor(sum(ref)), atol=1e-6, rtol=1e-6)
    # Changing the logit of an ignored entry changes nothing.
    logits2 = logits.clone()
    logits2[1, 0] = 50.0
    torch.testing.assert_close(multilabel_bce(logits2, t, m)[0], loss)


def test_batch_adaptive_positive_weight():
    logits = torch.tensor([[0.3, -1.0], [1.5, 0.2], [-0.7, 0.9], [0.0, -2.0]], requires_grad=True)
    t = torch.tensor([[1., 0.], [0., 0.], [0., 0.], [1., 0.]])  # finding 1: no positive in the batch
    m = torch.ones_like(t, dtype=torch.bool)
    loss, per = multilabel_bce(logits, t, m, batch_weight=True)
    w = (4 - 2) / 2
    ref0 = sum(_bce(logits[b, 0].item(), t[b, 0].item(), w) for b in range(4)) / 4
    torch.testing.assert_close(per, torch.tensor([ref0, 0.0]), atol=1e-6, rtol=1e-6)
    loss.backward()
    assert logits.grad[:, 1].abs().sum() == 0 and logits.grad[:, 0].abs().sum() > 0
    # one positive, three negatives: the positive weighs 3
    t = torch.tensor([[1.], [0.], [0.], [0.]])
    z = torch.zeros(4, 1)
    _, per = multilabel_bce(z, t, torch.ones_like(t, dtype=torch.bool), batch_weight=True)
    torch.testing.assert_close(per, torch.tensor([(3 * math.log(2) + 3 * math.log(2)) / 4]))


def test_bad_labels_and_policies_are_named():
    with pytest.raises(ValueError, match="uncertain.b: 'maybe'"):
        check_policies(["ignore", "maybe"], ["a", "b"])
    with pytest.raises(ValueError, match="2 policies for 3 findings"):
        check_policies(["ignore", "ones"], ["a", "b", "c"])
    assert check_policies(["ones"], ["a", "b"]) == ["ones", "ones"]
    with pytest.raises(ValueError, match="1, 0 or -1; found 2"):
        apply_uncertain(torch.tensor([[2.0, 0.0]]), ["ignore", "ignore"])
