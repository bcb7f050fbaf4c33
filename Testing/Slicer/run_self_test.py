"""Run the MedCLIPSAM self-test in a Slicer installation and exit with 0 (passed) or 1 (failed).

Usage, from the repository root:

    Slicer --no-main-window --python-script Testing/Slicer/run_self_test.py

The MedCLIPSAM module must be installed (extension) or added to Slicer's module paths. The test builds tiny models
in a temporary folder, so it needs no network.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import slicer

REPOSITORY = Path(__file__).resolve().parents[2]
for folder in (REPOSITORY / "MedCLIPSAM", REPOSITORY):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def main() -> int:
    from MedCLIPSAMModule.selftest import runSelfTest

    slicer.mrmlScene.Clear()
    with tempfile.TemporaryDirectory(prefix="MedCLIPSAMSelfTest") as workFolder:
        try:
            runSelfTest(slicer.mrmlScene, workFolder, log=print)
        except Exception:  # report any failure as a non-zero exit code
            traceback.print_exc()
            return 1
    return 0


slicer.util.exit(main())
