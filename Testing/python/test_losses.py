"""Losses against hand computations: Dice, attention maps, SAD, re-weighted CE."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssanet.losses import (SSANetLoss, attention_map, class_weights, pixel_counts,
                           reweighted_cross_entropy, sad_loss, soft_dice_loss)


def test_binary_dice_hand_case():
    logits = torch.full((1, 1, 2, 2), 50.0)   # sigmoid -> 1 everywhere
    target = torch.tensor([[[1, 0], [0, 0]]])
    # dice = (2*1 + 1) / (4 + 1 + 1) = 0.5
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-6)


def test_multiclass_dice_perfect_and_ignores_background():
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 100
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    # predict all background: class1 dice = 1/(1+1), class2 = 1/(2+1)
    bad = torch.zeros(1, 3, 2, 2); bad[:, 0] = 100
    expected = 1 - (0.5 + 1 / 3) / 2
    assert soft_dice_loss(bad, target).item() == pytest.approx(expected, abs=1e-5)


def test_per_slice_dice_hand_case_counts_false_positives_on_slices_without_the_class():
    # slice 0: GGO at (0, 0), predicted exactly; slice 1: consolidation at (1, 1) predicted,
    # plus a false consolidation pixel at (0, 0); no slice has both classes
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 2]]])
    pred = torch.tensor([[[1, 0], [0, 0]], [[2, 0], [0, 2]]])
    logits = F.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 100
    # batch sums: GGO 2*1+1 / (1+1+1) = 1; consolidation (2*1+1) / (2+1+1) = 3/4
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 - (1 + 0.75) / 2, abs=1e-5)
    # per slice: slice 0 GGO 1, consolidation 1 (absent, none predicted);
    # slice 1 GGO 1, consolidation (2+1) / (2+1+1) = 3/4
    per = soft_dice_loss(logits, target, per_slice=True).item()
    assert per == pytest.approx(1 - (1 + 1 + 1 + 0.75) / 4, abs=1e-5)
    # a false pixel on a slice without the class: per slice it costs that slice's whole Dice
    pred0 = torch.tensor([[[1, 2], [0, 0]], [[0, 0], [0, 2]]])
    fp = F.one_hot(pred0, 3).permute(0, 3, 1, 2).float() * 100
    assert soft_dice_loss(fp, target, per_slice=True).item() == pytest.approx(1 - (1 + 0.5 + 1 + 1) / 4, abs=1e-5)
    assert soft_dice_loss(fp, target).item() == pytest.approx(1 - (1 + 0.75) / 2, abs=1e-5)


def test_per_slice_binary_dice_and_the_loss_switch():
    logits = torch.full((2, 1, 2, 2), 50.0)
    target = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]]])
    # slice 0: (2+1)/(4+1+1) = 0.5; slice 1: (8+1)/(8+1) = 1
    assert soft_dice_loss(logits, target, per_slice=True).item() == pytest.approx(0.25, abs=1e-6)
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 - 11 / 14, abs=1e-6)
    loss = SSANetLoss(use_sad=False, dice_per_slice=True)
    assert loss(logits, target)["dice"].item() == pytest.approx(0.25, abs=1e-6)


def test_attention_map_hand_computation():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    f[0, 1] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    a = attention_map(f)                              # sum_c A^2 = [[2,1],[0,4]]
    e = np.exp([2.0, 1.0, 0.0, 4.0])
    assert np.allclose(a.numpy()[0], e / e.sum(), atol=1e-6)
    assert a.shape == (1, 4)


def test_sad_loss_hand_computation():
    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 2, 2), torch.randn(2, 6, 1, 1)]
    expected = 0.0
    for s, d in zip(feats[:-1], feats[1:]):
        a_s = torch.softmax((s ** 2).sum(1).flatten(1), 1)
        up = F.interpolate((d ** 2).sum(1, keepdim=True), size=s.shape[-2:], mode="bilinear", align_corners=False)
        a_d = torch.softmax(up.flatten(1), 1)
        expected += ((a_s - a_d) ** 2).mean().item()
    assert sad_loss(feats).item() == pytest.approx(expected, rel=1e-5)


def test_sad_detach_stops_gradient_into_deeper_stage():
    s = torch.randn(1, 2, 4, 4, requires_grad=True)
    d = torch.randn(1, 2, 2, 2, requires_grad=True)
    sad_loss([s, d], detach_target=True).backward()
    assert d.grad is None and s.grad is not None
    s2 = s.detach().requires_grad_(); d2 = d.detach().requires_grad_()
    sad_loss([s2, d2], detach_target=False).backward()
    assert d2.grad is not None and d2.grad.abs().sum() > 0


def test_class_weights_paper_formula():
    counts = pixel_counts([np.array([[0, 0, 0, 1], [0, 0, 2, 1]])], 3)   # 5, 2, 1 of 8
    assert counts.tolist() == [5, 2, 1]
    w = class_weights(counts)
    assert np.allclose(w, [1 / (3 * 5 / 8), 1 / (3 * 2 / 8), 1 / (3 * 1 / 8)])
    assert class_weights([4, 0, 4]).tolist() == [1 / (3 * 0.5), 0.0, 1 / (3 * 0.5)]
    with pytest.raises(ValueError):
        class_weights([0, 0, 0])


def test_reweighted_cross_entropy_value():
    logits = torch.tensor([[[[2.0]], [[0.0]], [[0.0]]], [[[0.0]], [[1.0]], [[0.0]]]])  # (2,3,1,1)
    target = torch.tensor([[[0]], [[1]]])
    w = [0.5, 2.0, 1.0]
    l0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    l1 = -math.log(math.e / (math.e + 2))
    expected = (0.5 * l0 + 2.0 * l1) / (0.5 + 2.0)
    assert reweighted_cross_entropy(logits, target, w).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_switches_sad_on_at_start_epoch():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8)
    target = torch.randint(0, 3, (1, 8, 8))
    feats = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)]
    fn = SSANetLoss(sad_start_epoch=40)
    before, after = fn(logits, target, feats, epoch=39), fn(logits, target, feats, epoch=40)
    assert "sad" not in before and "sad" in after
    assert after["sad"].item() == pytest.approx(0.1 * sad_loss(feats).item())
    assert after["total"].item() == pytest.approx(before["total"].item() + after["sad"].item(), rel=1e-6)


def test_unknown_pixels_carry_no_loss():
    """Pixels whose target is IGNORE_INDEX (untrusted pseudo labels with --untrusted ignore):
    Dice and CE equal the losses over the known pixels alone, whatever is predicted there."""
    from ssanet.data import IGNORE_INDEX
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6)
    target = torch.randint(0, 3, (2, 4, 6))
    known = target.clone()
    known[:, :, 3:] = IGNORE_INDEX                  # the right half unknown
    other = logits.clone()
    other[:, :, :, 3:] = torch.randn(2, 3, 4, 3) * 10
    w = [0.5, 2.0, 1.0]
    for fn in (lambda lg, t: soft_dice_loss(lg, t),
               lambda lg, t: soft_dice_loss(lg, t, per_slice=True),
               lambda lg, t: reweighted_cross_entropy(lg, t, w)):
        a, b = fn(logits, known).item(), fn(other, known).item()
        assert a == pytest.approx(b, abs=1e-6)
        # the same as the loss over the known half only
        assert a == pytest.approx(fn(logits[..., :3].contiguous(), target[..., :3].contiguous()).item(), abs=1e-6)
        assert a != pytest.approx(fn(logits, target).item(), abs=1e-4)
    # with the background class counted too, unknown pixels are still no class
    for a, b in ((logits, other),):
        assert soft_dice_loss(a, known, ignore_background=False).item() == pytest.approx(
            soft_dice_loss(a[..., :3].contiguous(), target[..., :3].contiguous(), ignore_background=False).item(),
            abs=1e-6)
        assert soft_dice_loss(a, known, ignore_background=False).item() == pytest.approx(
            soft_dice_loss(b, known, ignore_background=False).item(), abs=1e-6)
    # binary Dice too
    blog = torch.randn(1, 1, 2, 4)
    bt = torch.tensor([[[1, 0, IGNORE_INDEX, IGNORE_INDEX], [0, 1, IGNORE_INDEX, IGNORE_INDEX]]])
    assert soft_dice_loss(blog, bt).item() == pytest.approx(
        soft_dice_loss(blog[..., :2], bt[..., :2]).item(), abs=1e-6)
    # a batch with nothing known gives zero cross-entropy with a gradient path, not NaN
    lg = torch.randn(1, 3, 2, 2, requires_grad=True)
    ce = reweighted_cross_entropy(lg, torch.full((1, 2, 2), IGNORE_INDEX), w)
    assert ce.item() == 0.0
    ce.backward()
    # and pixel counts (class shares for re-weighting) count no unknown pixel
    from ssanet.data import UNKNOWN_LABEL
    assert pixel_counts([np.array([[0, 1, UNKNOWN_LABEL], [2, UNKNOWN_LABEL, 1]], np.uint8)], 3).tolist() == [1, 2, 1]
