"""The classes an SSA-Net predicts, by name, background first.

Torch-free, so the CT pipeline, the statistics and the Slicer module name the classes
from this one place without importing the network.
"""
from __future__ import annotations

MULTICLASS = ("background", "ggo", "consolidation")  # the paper's multi-class task (softmax)
BINARY = ("background", "infection")                  # the binary task (one sigmoid output)


def default_class_names(num_classes: int) -> list[str]:
    """The class names of a network with ``num_classes`` outputs (1 = the binary task)."""
    if num_classes == 1:
        return list(BINARY)
    if num_classes == len(MULTICLASS):
        return list(MULTICLASS)
    return ["background"] + [f"class{i}" for i in range(1, num_classes)]
