"""Weak supervision: a residual U-Net trained on the zero-shot masks of a data set.

Modules: `unet` (the network), `data` (pairs, input preparation, augmentation), `train` (training, checkpoints,
DistributedDataParallel), `predict` (`WeakSegmenter`, `evaluate_weak`) and `pseudolabel` (zero-shot masks for a
whole data set). The names below are imported on first use, so ``import MedCLIPSAMLib.weak`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = [
    "ResidualUNet",
    "WeakSegmenter",
    "WeakTrainConfig",
    "evaluate_weak",
    "load_checkpoint",
    "pseudo_label_dataset",
    "train_weak",
]

_EXPORTS = {
    "ResidualUNet": "unet",
    "WeakSegmenter": "predict",
    "WeakTrainConfig": "train",
    "evaluate_weak": "predict",
    "load_checkpoint": "train",
    "pseudo_label_dataset": "pseudolabel",
    "train_weak": "train",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
