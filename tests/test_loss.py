"""Anatomy-wise contrastive loss: hand-computed targets and values, skip rules, a loop reference, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.loss import anatomy_contrastive_loss, false_negative_targets

T, Fa = True, False


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------------------- target matrices
def test_targets_both_switches():
    # samples 0, 1 normal (different texts); 2, 3 abnormal with the identical text
    is_normal = torch.tensor([T, T, Fa, Fa])
    text_id = torch.tensor([1, 2, 3, 3])
    expected = _t([[.5, .5, 0, 0],
                   [.5, .5, 0, 0],
                   [0, 0, .5, .5],
                   [0, 0, .5, .5]])
    assert torch.equal(false_negative_targets(is_normal, text_id, True, True), expected)


def test_targets_normal_only():
    is_normal = torch.tensor([T, T, Fa, Fa])
    text_id = torch.tensor([1, 2, 3, 3])
    expected = _t([[.5, .5, 0, 0],
                   [.5, .5, 0, 0],
                   [0, 0, 1, 0],
                   [0, 0, 0, 1]])
    assert torch.equal(false_negative_targets(is_normal, text_id, True, False), expected)


def test_targets_same_text_only():
    is_normal = torch.tensor([T, T, Fa, Fa])
    text_id = torch.tensor([1, 2, 3, 3])
    expected = _t([[1, 0, 0, 0],
                   [0, 1, 0, 0],
                   [0, 0, .5, .5],
                   [0, 0, .5, .5]])
    assert torch.equal(false_negative_targets(is_normal, text_id, False, True), expected)


def test_targets_switches_off_is_identity():
    is_normal = torch.tensor([T, T, Fa])
    text_id = torch.tensor([7, 7, 7])
    assert torch.equal(false_negative_targets(is_normal, text_id, False, False), torch.eye(3))


def test_targets_diagonal_counted_once():
    # sample 0 is its own positive three ways (identity, normal, same text): counted once, not three times
    is_normal = torch.tensor([T, Fa, T])
    text_id = torch.tensor([4, 4, 9])
    expected = _t([[1 / 3, 1 / 3, 1 / 3],
                   [.5, .5, 0],
                   [.5, 0, .5]])
    torch.testing.assert_close(false_negative_targets(is_normal, text_id), expected, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------- hand-computed values
def test_loss_value_2x2_identity_targets():
    # I0 = [1, 0], I1 = [0, 1]; T0 = [1, 0], T1 = [.6, .8]; temp 0.5 -> logits [[2, 1.2], [0, 1.6]]
    # both abnormal with different texts: S = identity
    img = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    txt = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])
    valid = torch.tensor([[T], [T]])
    out = anatomy_contrastive_loss(img, txt, valid, torch.tensor([[Fa], [Fa]]), torch.tensor([[1], [2]]), 0.5,
                                   anatomy_names=["lung"])
    i2t = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    t2i = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-0.4))) / 2
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.2987362, abs=1e-6)
    assert out["loss/lung"].item() == pytest.approx(0.2987362, abs=1e-6)
    assert out["n/lung"].item() == 2


def test_loss_value_3x3_soft_targets_and_invalid_sample():
    # I = T = e1, e2, e3, temp 1 -> logits = identity; samples 0, 1 normal, 2 abnormal:
    # S = [[.5, .5, 0], [.5, .5, 0], [0, 0, 1]]; rows 0, 1: log(e + 2) - 1/2, row 2: log(e + 2) - 1
    # -> mean log(e + 2) - 2/3 both ways. A 4th, invalid sample must change nothing.
    eye = torch.eye(3)
    junk = torch.tensor([[0.6, 0.0, 0.8]])
    img = torch.cat([eye, junk])[:, None]
    txt = torch.cat([eye, junk])[:, None]
    valid = torch.tensor([[T], [T], [T], [Fa]])
    is_normal = torch.tensor([[T], [T], [Fa], [Fa]])
    text_id = torch.tensor([[1], [2], [3], [3]])
    out = anatomy_contrastive_loss(img, txt, valid, is_normal, text_id, torch.tensor(1.0))
    assert out["loss"].item() == pytest.approx(math.log(math.e + 2) - 2 / 3, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.8847780, abs=1e-6)
    assert out["n/0"].item() == 3


# ------------------------------------------------------------------------------------------- skip rules
def _features(b, a, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, a, e, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, a, e, generator=g), dim=-1)
    return img, txt


def test_skip_without_abnormal_sample():
    img, txt = _features(4, 2)
    valid = torch.ones(4, 2, dtype=torch.bool)
    is_normal = torch.tensor([[T, T], [T, Fa], [T, T], [T, T]])  # anatomy 0 all normal
    text_id = torch.arange(8).view(4, 2)
    out = anatomy_contrastive_loss(img, txt, valid, is_normal, text_id, 0.07, anatomy_names=["lung", "heart"])
    assert out["loss/lung"].item() == 0 and out["n/lung"].item() == 0
    assert out["loss/heart"].item() > 0 and out["n/heart"].item() == 4
    assert out["loss"].item() == pytest.approx(out["loss/heart"].item())
    # the only abnormal heart is not valid -> heart skipped too
    valid[1, 1] = False
    out = anatomy_contrastive_loss(img, txt, valid, is_normal, text_id, 0.07, anatomy_names=["lung", "heart"])
    assert out["loss"].item() == 0 and out["n/heart"].item() == 0


def test_skip_uniform_targets_and_single_sample():
    img, txt = _features(3, 1)
    # all abnormal with the identical text: every pair positive -> uniform -> skipped
    out = anatomy_contrastive_loss(img, txt, torch.ones(3, 1, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.bool),
                                   torch.full((3, 1), 5), 0.07)
    assert out["loss"].item() == 0 and out["n/0"].item() == 0
    # the same batch without the identical-text rule: identity targets -> not skipped
    out = anatomy_contrastive_loss(img, txt, torch.ones(3, 1, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.bool),
                                   torch.full((3, 1), 5), 0.07, same_text_positives=False)
    assert out["loss"].item() > 0 and out["n/0"].item() == 3
    # one valid (abnormal) sample: fewer than 2 -> skipped
    valid = torch.tensor([[T], [Fa], [Fa]])
    out = anatomy_contrastive_loss(img, txt, valid, torch.zeros(3, 1, dtype=torch.bool), torch.arange(3)[:, None], 0.07)
    assert out["loss"].item() == 0 and out["n/0"].item() == 0


# ----------------------------------------------------------------------------- loop reference, gradients
def _loop_reference(img, txt, valid, is_normal, text_id, temp, normal_positives, same_text_positives):
    total = torch.zeros(())
    for k in range(img.shape[1]):
        v = valid[:, k]
        if v.sum() < 2 or not (v & ~is_normal[:, k]).any():
            continue
        s = false_negative_targets(is_normal[v, k], text_id[v, k], normal_positives, same_text_positives)
        if torch.all(s == s[0, 0]):
            continue
        logits = img[v, k] @ txt[v, k].T / temp
        i2t = -(s * F.log_softmax(logits, dim=1)).sum(1).mean()
        t2i = -(s * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        total = total + (i2t + t2i) / 2
    return total


@pytest.mark.parametrize("switches", [(True, True), (True, False), (False, True), (False, False)])
def test_vectorised_equals_loop(switches):
    g = torch.Generator().manual_seed(3)
    b, a = 9, 4
    img, txt = _features(b, a, seed=1)
    valid = torch.rand(b, a, generator=g) < 0.75
    is_normal = torch.rand(b, a, generator=g) < 0.5
    text_id = torch.randint(0, 4, (b, a), generator=g)
    temp = torch.tensor(0.1)
    out = anatomy_contrastive_loss(img, txt, valid, is_normal, text_id, temp, normal_positives=switches[0],
                                   same_text_positives=switches[1])
    ref = _loop_reference(img, txt, valid, is_normal, text_id, temp, *switches)
    assert ref.item() > 0
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)


def test_gradients_finite_and_connected_when_nothing_valid():
    img, txt = _features(3, 2)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    temp = torch.tensor(0.07, requires_grad=True)
    valid = torch.zeros(3, 2, dtype=torch.bool)
    out = anatomy_contrastive_loss(img, txt, valid, torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2,
                                   dtype=torch.long), temp)
    assert out["loss"].item() == 0
    out["loss"].backward()
    for t in (img, txt, temp):
        assert t.grad is not None and torch.all(t.grad == 0)


def test_gradients_match_loop_reference():
    g = torch.Generator().manual_seed(5)
    img, txt = _features(6, 3, seed=2)
    valid = torch.rand(6, 3, generator=g) < 0.8
    is_normal = torch.rand(6, 3, generator=g) < 0.5
    is_normal[0] = False
    valid[0] = True
    text_id = torch.randint(0, 3, (6, 3), generator=g)
    grads = []
    for fn in ("ours", "loop"):
        a, b_ = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        t = torch.tensor(0.2, requires_grad=True)
        if fn == "ours":
            loss = anatomy_contrastive_loss(a, b_, valid, is_normal, text_id, t)["loss"]
        else:
            loss = _loop_reference(a, b_, valid, is_normal, text_id, t, True, True)
        loss.backward()
        assert all(torch.isfinite(x.grad).all() for x in (a, b_, t))
        grads.append((a.grad, b_.grad, t.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_shape_errors():
    img, txt = _features(2, 2)
    with pytest.raises(ValueError, match="valid"):
        anatomy_contrastive_loss(img, txt, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool),
                                 torch.zeros(2, 2, dtype=torch.long), 0.07)
    with pytest.raises(ValueError, match="anatomy names"):
        anatomy_contrastive_loss(img, txt, torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool),
                                 torch.zeros(2, 2, dtype=torch.long), 0.07, anatomy_names=["lung"])


def test_loss_is_float32_inside_autocast():
    g = torch.Generator().manual_seed(7)
    img, txt = _features(6, 2, e=32, seed=4)
    valid = torch.ones(6, 2, dtype=torch.bool)
    is_normal = torch.rand(6, 2, generator=g) < 0.5
    is_normal[0] = False
    text_id = torch.arange(12).view(6, 2)
    ref = anatomy_contrastive_loss(img, txt, valid, is_normal, text_id, 0.01)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = anatomy_contrastive_loss(img, txt, valid, is_normal, text_id, 0.01)["loss"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
