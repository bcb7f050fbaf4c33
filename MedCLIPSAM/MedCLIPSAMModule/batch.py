"""Batch segmentation of every scalar series of a DICOM folder with a list of prompts.

Each (series, prompt) pair is one case. A case that fails (unreadable pixel data, a volume too small to slice ...)
is reported in the returned list and the batch goes on with the next case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from MedCLIPSAMLib.cli.volume import safe_file_name
from MedCLIPSAMLib.errors import InvalidInputError, MedCLIPSAMError

from . import mrml
from .logic import PARTIAL_DISCARD, MedCLIPSAMLogic, SegmenterSettings

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_CANCELLED = "cancelled"


@dataclass
class BatchCaseResult:
    """Outcome of one (series, prompt) case of `segmentDicomFolder`."""

    seriesKey: str
    caseName: str
    prompt: str
    status: str
    message: str = ""
    segmentationPath: Path | None = None
    saliencyPath: Path | None = None
    foundSlices: int = 0


def caseName(metadata: dict, seriesKey: str) -> str:
    """Build the file-name stem ``<patient>_<study>_<series>`` of a DICOM series, with fallbacks for blank fields.

    Patient: PatientID, else PatientName, else "UnknownPatient". Study: StudyDescription, else StudyDate, else the
    last 12 characters of StudyInstanceUID, else "UnknownStudy". Series: SeriesDescription, else "Series<number>",
    else the last 12 characters of SeriesInstanceUID, else the series key.
    """
    def field(name: str) -> str:
        return str(metadata.get(name) or "").strip()

    patient = field("PatientID") or field("PatientName") or "UnknownPatient"
    study = field("StudyDescription") or field("StudyDate") or field("StudyInstanceUID")[-12:] or "UnknownStudy"
    series = (
        field("SeriesDescription")
        or (f"Series{field('SeriesNumber')}" if field("SeriesNumber") else "")
        or field("SeriesInstanceUID")[-12:]
        or seriesKey
    )
    return "_".join(safe_file_name(part, "unnamed") for part in (patient, study, series))


def _volumeNodeFromImage(scene, image, name: str):
    """Add a SimpleITK 3D image to the scene as a scalar volume node with the image's geometry."""
    import SimpleITK as sitk

    from MedCLIPSAMLib.geometry import ijk_to_ras_from_itk

    array = sitk.GetArrayFromImage(image)
    ijkToRas = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return mrml.addScalarVolumeFromArray(scene, array, ijkToRas, name)


def _writeNode(scene, node, path: Path, storageClass: str) -> None:
    storageNode = scene.AddNewNodeByClass(storageClass)
    try:
        storageNode.SetFileName(str(path))
        storageNode.SetUseCompression(1)
        if not storageNode.WriteData(node):
            raise OSError(f"Writing {path} failed.")
    finally:
        scene.RemoveNode(storageNode)


def _removeNodes(scene, nodes) -> None:
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        if node.IsA("vtkMRMLDisplayableNode"):
            for index in range(node.GetNumberOfDisplayNodes()):
                displayNode = node.GetNthDisplayNode(index)
                if displayNode is not None:
                    scene.RemoveNode(displayNode)
        scene.RemoveNode(node)


def segmentDicomFolder(
    logic: MedCLIPSAMLogic,
    folder: str | Path,
    prompts: list[str],
    outputFolder: str | Path,
    axis: str = "axial",
    sliceRange: tuple[int, int] | None = None,
    settings: SegmenterSettings | None = None,
    progress=None,
    cancel=None,
) -> list[BatchCaseResult]:
    """Segment every scalar series of a DICOM folder with every prompt and save the results as files.

    Writes ``<case>_<prompt>.seg.nrrd`` and ``<case>_<prompt>_saliency.nrrd`` into `outputFolder`, where the
    case name comes from `caseName`. The scene is left as it was: the nodes of each case are removed after saving.

    Args:
        logic: Logic whose scene and segmenter are used.
        folder: DICOM folder, searched recursively.
        prompts: Text prompts; each gives one segmentation file per series.
        outputFolder: Created if missing.
        axis, sliceRange, settings: As in `MedCLIPSAMLogic.segmentVolume`; a slice range longer than a series
            is cut to the series.
        progress: Called as progress(done_cases, total_cases, message) after each case.
        cancel: Polled between cases and slices; True stops the batch and the remaining cases are not run.

    Returns:
        One BatchCaseResult per (series, prompt) case that was run, in order.
    """
    from MedCLIPSAMLib.io import list_dicom_series, read_volume

    prompts = [prompt.strip() for prompt in prompts if isinstance(prompt, str) and prompt.strip()]
    if not prompts:
        raise InvalidInputError("The batch needs at least one non-empty prompt.")
    outputFolder = Path(outputFolder)
    outputFolder.mkdir(parents=True, exist_ok=True)
    seriesList = list_dicom_series(folder)
    if not seriesList:
        raise InvalidInputError(f"No DICOM image series found in {folder} (searched recursively).")

    results: list[BatchCaseResult] = []
    total = len(seriesList) * len(prompts)
    usedNames: set[str] = set()
    for seriesKey, _files, metadata in seriesList:
        name = caseName(metadata, seriesKey)
        while name in usedNames:
            name += "_"
        usedNames.add(name)
        try:
            image = read_volume(folder, series_uid=seriesKey)
        except (MedCLIPSAMError, OSError, RuntimeError) as error:
            logger.warning("Series %s (%s) cannot be read: %s", seriesKey, name, error)
            results.extend(BatchCaseResult(seriesKey, name, prompt, STATUS_FAILED, str(error)) for prompt in prompts)
            continue

        volumeNode = None
        try:
            volumeNode = _volumeNodeFromImage(logic.scene, image, name)
            for prompt in prompts:
                if cancel is not None and cancel():
                    return results
                result = _runCase(logic, volumeNode, seriesKey, name, prompt, outputFolder, axis, sliceRange,
                                  settings, cancel)
                results.append(result)
                if progress is not None:
                    progress(len(results), total, f"{name} / {prompt}: {result.status}")
                if result.status == STATUS_CANCELLED:
                    return results
        finally:
            _removeNodes(logic.scene, [volumeNode])
    return results


def _rangeWithinVolume(volumeNode, axis: str, sliceRange):
    """Cut a half-open slice range to the number of slices the volume has along the chosen axis."""
    if sliceRange is None:
        return None
    from MedCLIPSAMLib.geometry import slice_axis_for

    shape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
    count = shape[slice_axis_for(mrml.ijkToRasArray(volumeNode), axis, shape)]
    return (min(int(sliceRange[0]), count - 1), min(int(sliceRange[1]), count))


def _runCase(logic, volumeNode, seriesKey, name, prompt, outputFolder, axis, sliceRange, settings, cancel):
    stem = f"{name}_{safe_file_name(prompt, 'prompt')}"
    segmentationPath = outputFolder / f"{stem}.seg.nrrd"
    saliencyPath = outputFolder / f"{stem}_saliency.nrrd"
    outcome = None
    try:
        caseRange = _rangeWithinVolume(volumeNode, axis, sliceRange)
        outcome = logic.segmentVolume(
            volumeNode, prompt, axis=axis, sliceRange=caseRange, settings=settings, showSaliency=False,
            partialPolicy=PARTIAL_DISCARD, cancel=cancel,
        )
        if outcome.cancelled:
            return BatchCaseResult(seriesKey, name, prompt, STATUS_CANCELLED, "Cancelled; no files written.")
        _writeNode(logic.scene, outcome.segmentationNode, segmentationPath, "vtkMRMLSegmentationStorageNode")
        _writeNode(logic.scene, outcome.saliencyNode, saliencyPath, "vtkMRMLVolumeArchetypeStorageNode")
        return BatchCaseResult(
            seriesKey, name, prompt, STATUS_OK, outcome.summary(), segmentationPath, saliencyPath,
            len(outcome.foundSlices),
        )
    except (MedCLIPSAMError, OSError, RuntimeError) as error:
        logger.warning("Case %s / %r failed: %s", name, prompt, error)
        return BatchCaseResult(seriesKey, name, prompt, STATUS_FAILED, str(error))
    finally:
        if outcome is not None:
            _removeNodes(logic.scene, [outcome.segmentationNode, outcome.saliencyNode])
