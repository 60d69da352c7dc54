"""Small lesion islands removed after the argmax: areas in mm², classes together, one
setting followed by evaluation and recorded by checkpoints."""
import types

import numpy as np
import pytest

from ssanet.evaluate import evaluate_samples
from ssanet.postprocess import (checkpoint_min_lesion_mm2, labels_from_probabilities,
                                remove_small_lesions)


def islands_map():
    lab = np.zeros((40, 40), np.uint8)
    lab[2:4, 2:7] = 1            # 10 pixels of GGO
    lab[10:16, 10:15] = 2        # 30 pixels of consolidation ...
    lab[16:18, 10:15] = 1        # ... touching 10 pixels of GGO: one 40-pixel island
    lab[30, 30] = lab[31, 31] = 1  # two pixels touching at a corner: one island
    return lab


def test_islands_below_the_area_go_to_background_classes_together():
    lab = islands_map()
    out = remove_small_lesions(lab, (1.0, 1.0), 12)
    assert not out[2:4, 2:7].any() and not out[30:32, 30:32].any()   # 10 and 2 mm² removed
    np.testing.assert_array_equal(out[10:18], lab[10:18])             # 40 mm² kept, both classes
    out = remove_small_lesions(lab, (1.0, 1.0), 2)                    # the corner pair is one island of 2
    assert out[30, 30] == 1 and out[31, 31] == 1
    np.testing.assert_array_equal(remove_small_lesions(lab, (1.0, 1.0), 0), lab)
    assert lab[2, 2] == 1                                             # the input is not modified


def test_the_area_is_physical():
    lab = islands_map()
    # at 0.5 mm the 40-pixel island is 10 mm², the 10-pixel one 2.5 mm²
    out = remove_small_lesions(lab, (0.5, 0.5), 5)
    assert not out[2:4, 2:7].any() and out[10:18].any()
    assert not remove_small_lesions(lab, (0.5, 0.5), 10.5).any()
    assert remove_small_lesions(lab, (2.0, 0.5), 10)[10:18].any()    # 40 px x 1 mm² = 40 mm²


def test_labels_from_probabilities_argmax_lung_and_islands():
    probs = np.zeros((3, 40, 40), np.float32)
    probs[0] = 0.5
    probs[1][islands_map() == 1] = 0.9
    probs[2][islands_map() == 2] = 0.9
    lung = np.ones((40, 40), bool)
    lung[:, 12:] = False
    out = labels_from_probabilities(probs, (1.0, 1.0), 0, lung)
    assert out.dtype == np.uint8 and (out[:, 12:] == 0).all() and out[10, 10] == 2 and out[2, 2] == 1
    out = labels_from_probabilities(probs, (1.0, 1.0), 11, lung)
    assert out[2, 2] == 0 and out[10, 10] == 2        # the 40 px island keeps 16 px inside the lung


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_bad_area_is_refused(bad):
    with pytest.raises(ValueError, match="minimum lesion island"):
        remove_small_lesions(islands_map(), (1.0, 1.0), bad)


def test_checkpoint_setting():
    assert checkpoint_min_lesion_mm2(None) == 0.0
    assert checkpoint_min_lesion_mm2({"inference": {"flip_tta": True}}) == 0.0
    assert checkpoint_min_lesion_mm2({"inference": {"min_lesion_mm2": 25}}) == 25.0


class FixedPredictor:
    """Returns the same probabilities for every slice (the evaluation code path is real)."""
    batch_size = 4

    def __init__(self, probs):
        self.probs = probs

    def predict(self, x):
        return np.repeat(self.probs[None], len(x), axis=0)


def test_evaluation_follows_the_checkpoint_unless_overridden():
    lab = islands_map()
    gt = lab.copy()
    gt[2:4, 2:7] = 0
    gt[30:32, 30:32] = 0                     # the truth has only the 40 mm² island
    probs = np.stack([(lab == 0), (lab == 1), (lab == 2)]).astype(np.float32)
    sample = types.SimpleNamespace(id="s", image=np.full((40, 40), 100, np.uint8), lung=np.ones((40, 40), bool),
                                   label=gt, spacing=(1.0, 1.0))
    meta = {"class_names": ["background", "ggo", "consolidation"], "preprocessing": {"size": 40}}
    pred = FixedPredictor(probs)
    raw = evaluate_samples(pred, [sample], meta)
    assert raw["min_lesion_mm2"] == 0.0 and raw["classes"]["ggo"]["dsc"] < 1.0
    recorded = evaluate_samples(pred, [sample], {**meta, "inference": {"min_lesion_mm2": 12}})
    assert recorded["min_lesion_mm2"] == 12.0
    assert recorded["classes"]["ggo"]["dsc"] == 1.0 and recorded["classes"]["infection"]["hd95_mm"] == 0.0
    off = evaluate_samples(pred, [sample], {**meta, "inference": {"min_lesion_mm2": 12}}, min_lesion_mm2=0)
    assert off["classes"] == raw["classes"]
