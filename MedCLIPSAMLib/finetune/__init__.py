"""Fine-tuning of BiomedCLIP on image-caption pairs (DHN-NCE and related losses) and retrieval evaluation.

Modules: `losses` (DHN-NCE, HN-NCE, DCL, InfoNCE), `data` (caption CSV, cleaning, split, Dataset), `trainer`
(`finetune_clip`, saving open_clip folders), `distributed` (torchrun support), `retrieval` (top-k accuracy).
"""

from MedCLIPSAMLib.finetune.losses import LOSS_NAMES, ContrastiveLoss
from MedCLIPSAMLib.finetune.retrieval import evaluate_retrieval, retrieval_table
from MedCLIPSAMLib.finetune.trainer import FinetuneConfig, FinetuneResult, finetune_clip

__all__ = [
    "LOSS_NAMES",
    "ContrastiveLoss",
    "FinetuneConfig",
    "FinetuneResult",
    "evaluate_retrieval",
    "finetune_clip",
    "retrieval_table",
]
