"""Shared pytest fixtures: test data location and tiny models in the real on-disk formats."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

# Keep the two CPU cores of CI for the test process itself and make runs repeatable.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# No test may reach a model hub: make any accidental hub call fail fast instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

_SHARED_DATA = REPOSITORY_ROOT.parent / "shared" / "data"
_BUNDLED_DATA = REPOSITORY_ROOT / "Testing" / "Data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real test images: the project's shared data set when present, else the bundled subset.

    Both have the same layout (breast_ultrasound/, brain_mri/, chest_xray/ with images/ and masks/,
    dicom_series/, volumes/).
    """
    return _SHARED_DATA if _SHARED_DATA.is_dir() else _BUNDLED_DATA


@pytest.fixture(scope="session")
def bundled_data() -> Path:
    """Folder of the test images that ship with the repository (a subset of `shared_data`)."""
    return _BUNDLED_DATA


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """open_clip local-dir folder of a tiny BiomedCLIP-architecture model (seed 0)."""
    from MedCLIPSAMLib.tiny import build_tiny_biomedclip

    return build_tiny_biomedclip(tmp_path_factory.mktemp("tiny_biomedclip"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip_id(tiny_clip_dir) -> str:
    """Model id that `load_clip` and the CLI's --clip accept for the tiny model."""
    return f"local-dir:{tiny_clip_dir}"


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """State-dict checkpoint of the tiny SAM architecture (load with sam type "tiny")."""
    from MedCLIPSAMLib.tiny import build_tiny_sam

    return build_tiny_sam(tmp_path_factory.mktemp("tiny_sam") / "sam_tiny.pth", seed=0)
