"""SSA-Net losses: soft Dice, self-attention distillation (SAD), re-weighted cross-entropy.

Total supervised loss (paper, Eq. 4): ``Dice + alpha * SAD`` with alpha = 0.1, SAD switched
on after a warm-up (the paper's best: epoch 40 of 150). Multi-class models add the paper's
re-weighted cross-entropy (weight of class c = 1 / (C * P_c), P_c its pixel share).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

SAD_ALPHA = 0.1
SAD_START_EPOCH = 40


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   ignore_background: bool = True, per_slice: bool = False) -> torch.Tensor:
    """1 - mean soft Dice over classes, sums taken over the whole batch.

    Binary (logits N,1,H,W; target N,H,W in {0,1}): Dice of sigmoid(logits) with target.
    Multi-class (logits N,C,H,W; target N,H,W class indices): softmax, one-hot target,
    Dice per class averaged over foreground classes (background excluded by default,
    because it dominates the pixel count and would make the loss near zero).

    ``per_slice``: one Dice per slice and class, then the mean, as the evaluation averages
    per-slice DSC: a slice without a class then scores ``smooth / (predicted mass + smooth)``
    for it, so false positives there cost as much as anywhere (in the batch sum they are
    diluted by the other slices' lesions).

    Pixels whose target is not a class index (``ssanet.data.IGNORE_INDEX``) count for no
    class, as the cross-entropy's ``ignore_index`` skips them.
    """
    known = ((target >= 0) & (target < max(2, logits.shape[1])))[:, None]
    target = torch.where(known[:, 0], target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits)
        onehot = target.float()[:, None]
        ignore_background = False
    else:
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    probs = probs * known
    onehot = onehot * known   # an unknown pixel is no class, background included
    dims = (2, 3) if per_slice else (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)   # (N, C) per slice, else (C,)
    if ignore_background:
        dice = dice[..., 1:]
    return 1 - dice.mean()


def attention_map(feature: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """SAD attention map: sum_c |A_c|^2, bilinearly resized to ``size``, softmax over H*W.

    Returns (N, H*W) so that it is a spatial probability distribution per sample.
    """
    a = feature.float().pow(2).sum(dim=1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.softmax(a.flatten(1), dim=1)


def sad_loss(features: Sequence[torch.Tensor], detach_target: bool = False) -> torch.Tensor:
    """Self-attention distillation over successive encoder stages.

    For each pair (shallower, deeper) the deeper stage's attention is bilinearly upsampled
    to the shallower stage's size, and the MSE between the two maps is taken; the three
    pair losses are summed. ``detach_target=True`` treats the deeper map as a fixed
    distillation target (Hou et al. 2019); the official SSA-Net code does not detach.
    """
    if len(features) < 2:
        raise ValueError("SAD needs at least two stage feature maps")
    total = features[0].new_zeros((), dtype=torch.float32)
    for shallow, deep in zip(features[:-1], features[1:]):
        size = shallow.shape[-2:]
        a_s = attention_map(shallow, size)
        a_d = attention_map(deep, size)
        if detach_target:
            a_d = a_d.detach()
        total = total + F.mse_loss(a_s, a_d)
    return total


def class_weights(pixel_counts: Sequence[float]) -> np.ndarray:
    """The paper's re-weighting: w_c = 1 / (C * P_c), P_c = share of class c in all pixels.

    A class with no pixels gets weight 0 (it cannot appear in the targets anyway); the
    semi-supervised loop refuses labeled sets without every class before it gets here.
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 2:
        raise ValueError("pixel_counts must be a 1-D sequence with one count per class (>= 2)")
    total = counts.sum()
    if total <= 0:
        raise ValueError("pixel_counts sum to zero: no labeled pixels")
    share = counts / total
    with np.errstate(divide="ignore"):
        w = np.where(share > 0, 1.0 / (len(counts) * share), 0.0)
    return w


def pixel_counts(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for lab in labels:
        counts += np.bincount(np.asarray(lab, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]
    return counts


def reweighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                             weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with per-class weights (``None`` = plain CE).

    Normalised by the summed weights of the target pixels (PyTorch's weighted mean), so the
    loss scale does not depend on how rare a class is.
    """
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if not bool((target != IGNORE_INDEX).any()):   # nothing known: no signal (not NaN)
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), weight=w, ignore_index=IGNORE_INDEX)


@dataclass
class SSANetLoss:
    """Dice (+ re-weighted CE for multi-class) + alpha * SAD once ``epoch >= sad_start_epoch``."""

    alpha: float = SAD_ALPHA
    sad_start_epoch: int = SAD_START_EPOCH
    use_sad: bool = True
    detach_target: bool = False
    ce_weights: Sequence[float] | None = None
    use_ce: bool = True
    dice_per_slice: bool = False

    def sad_active(self, epoch: int) -> bool:
        return self.use_sad and epoch >= self.sad_start_epoch

    def __call__(self, logits, target, stage_maps=None, epoch: int = 0) -> dict:
        terms = {"dice": soft_dice_loss(logits, target, per_slice=self.dice_per_slice)}
        if logits.shape[1] > 1 and self.use_ce:
            terms["ce"] = reweighted_cross_entropy(logits, target, self.ce_weights)
        if self.sad_active(epoch):
            if stage_maps is None:
                raise ValueError("SAD is active but no stage feature maps were given")
            terms["sad"] = self.alpha * sad_loss(stage_maps, self.detach_target)
        terms["total"] = sum(terms.values())
        return terms
