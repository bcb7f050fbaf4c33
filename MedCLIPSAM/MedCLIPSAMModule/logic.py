"""MedCLIPSAM Logic: text-prompt segmentation of MRML volumes, usable without the GUI.

From Slicer's Python console::

    from MedCLIPSAMModule.logic import MedCLIPSAMLogic
    logic = MedCLIPSAMLogic()
    outcome = logic.segmentVolume(getNode("MRHead"), "brain", axis="axial")

The Logic converts between MRML nodes and numpy arrays and keeps the segment bookkeeping. All numerical work is done
by MedCLIPSAMLib (`ZeroShotSegmenter`, or a trained weak-supervision network).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import slicer
from MedCLIPSAMLib.cli.volume import PRECISION_TAG
from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.geometry import ANATOMICAL_AXES, anatomical_axis_of_array_axis, slice_axis_for

from . import mrml

try:  # Inside Slicer: the scripted-module base class (parameter node support). Not in the Qt-free slicer-core wheel.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:
    _LogicBase = object

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
CancelCallback = Callable[[], bool]

PARTIAL_KEEP = "keep"
PARTIAL_DISCARD = "discard"
PARTIAL_POLICIES = (PARTIAL_KEEP, PARTIAL_DISCARD)

# Node attributes that tie a saliency volume to its input and prompt, so a re-run reuses the node.
_ATTRIBUTE_PROMPT = "MedCLIPSAM.Prompt"
SEGMENT_TAG_PRECISION = PRECISION_TAG
"""Segment tag that records the compute type ("float32" or "bfloat16") of the zero-shot run that wrote the segment,
the same key that `medclipsam segment-volume` writes into its .seg.nrrd files."""
_ATTRIBUTE_INPUT = "MedCLIPSAM.InputVolumeID"

SALIENCY_OPACITY = 0.4
"""Foreground opacity of the saliency layer in slice views (0 transparent, 1 opaque)."""


@dataclass
class SegmenterSettings:
    """Models and pipeline parameters of a segmenter; equal settings reuse the cached segmenter.

    Empty strings mean "default": the BiomedCLIP hub model, SAM's cache folder, automatic device.
    """

    clipModelId: str = ""
    samType: str = "vit_b"
    samCheckpoint: str = ""
    modelsFolder: str = ""
    device: str = "auto"
    topK: int = 60
    crfTau: float = 1.05
    crfIterations: int = 1
    crfBilateralSxy: float = 60.0
    crfBilateralSrgb: float = 5.0
    presenceThreshold: float | None = None
    precision: str = "auto"
    """Compute type of the CLIP image tower and SAM's image encoder: "auto", "float32" or "bfloat16" (see
    `ZeroShotConfig.precision`). "auto" is bfloat16 where the hardware computes it natively, which is about twice
    as fast. bfloat16 masks may differ slightly from float32 masks."""
    weakModelCheckpoint: str = ""
    """Trained weak-supervision network; when set it replaces the zero-shot pipeline."""

    def key(self) -> tuple:
        return dataclasses.astuple(self)


@dataclass
class SegmentationOutcome:
    """Nodes and per-slice status of one `MedCLIPSAMLogic.segmentVolume` run.

    Slice indices count along `sliceAxis` of the volume's ``[K, J, I]`` array. After a cancel with the discard
    policy nothing is written: `segmentationNode`, `segmentId` and `saliencyNode` are then the caller's nodes or None.
    """

    prompt: str
    segmentationNode: object | None
    segmentId: str | None
    segmentName: str | None
    saliencyNode: object | None
    sliceAxis: int
    sliceAxisName: str
    foundSlices: list[int] = field(default_factory=list)
    notFoundSlices: list[int] = field(default_factory=list)
    skippedSlices: list[int] = field(default_factory=list)
    processedSlices: list[int] = field(default_factory=list)
    cancelled: bool = False
    written: bool = True
    precision: str | None = None
    """Compute type of the image encoders ("float32" or "bfloat16"); None for the weak-supervision network."""

    def summary(self) -> str:
        """Describe the run in one line for the status bar and the log."""
        if self.cancelled and not self.written:
            return f"Cancelled after {len(self.processedSlices)} slices; nothing was written."
        text = f"{self.segmentName}: found on {len(self.foundSlices)} of {len(self.processedSlices)} slices"
        if self.notFoundSlices:
            text += f"; not found on slices {_formatRanges(self.notFoundSlices)}"
        if self.skippedSlices:
            text += f"; skipped (below presence threshold) {_formatRanges(self.skippedSlices)}"
        if self.cancelled:
            text += " (cancelled, partial result kept)"
        if self.precision is not None:
            text += f"; computed in {self.precision}"
        return text + "."


def _formatRanges(indices: list[int]) -> str:
    """Format sorted slice indices compactly, e.g. [1, 2, 3, 7] -> "1-3, 7"."""
    parts = []
    values = sorted(indices)
    start = previous = values[0]
    for value in values[1:] + [None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return ", ".join(parts)


class MedCLIPSAMLogic(_LogicBase):
    """Segment MRML scalar volumes from a text prompt and write segments and saliency volumes.

    The models load on the first run and stay cached with the segmenter until the settings change.
    """

    def __init__(self, scene=None) -> None:
        """
        Args:
            scene: MRML scene to work in; None uses ``slicer.mrmlScene`` (the application's scene in Slicer).
        """
        if _LogicBase is not object:
            _LogicBase.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if self.scene is None:
            raise InvalidInputError("No MRML scene: pass scene=... when running outside the Slicer application.")
        self.segmenter = None
        """Segmenter used by `segmentVolume`; set it to use an already built one (same segment_volume API)."""
        self._segmenterKey = None

    # -- Segmenter -----------------------------------------------------------------------------------------------

    def getSegmenter(self, settings: SegmenterSettings | None = None, progress: ProgressCallback | None = None):
        """Return a segmenter for `settings`, building it (and loading models) only when the settings changed.

        With `settings` None, the current segmenter (cached, or set with `setSegmenter`) is returned, else one
        with default settings is built.

        With `settings.weakModelCheckpoint` set, the segmenter is the trained weak-supervision network; otherwise
        it is the zero-shot BiomedCLIP + SAM pipeline.
        """
        if settings is None:
            if self.segmenter is not None:
                return self.segmenter  # the cached or injected segmenter
            settings = SegmenterSettings()
        if self.segmenter is not None and self._segmenterKey == settings.key():
            return self.segmenter
        if settings.weakModelCheckpoint:
            segmenter = self._buildWeakSegmenter(settings)
        else:
            segmenter = self._buildZeroShotSegmenter(settings, progress)
        self.segmenter = segmenter
        self._segmenterKey = settings.key()
        return segmenter

    def setSegmenter(self, segmenter) -> None:
        """Use `segmenter` (any object with ZeroShotSegmenter's segment_volume signature) for the next runs."""
        self.segmenter = segmenter
        self._segmenterKey = None

    @staticmethod
    def _buildZeroShotSegmenter(settings: SegmenterSettings, progress: ProgressCallback | None):
        # Imported here: torch and the models load only when a segmentation is requested.
        from MedCLIPSAMLib import models
        from MedCLIPSAMLib.pipeline import ZeroShotConfig, ZeroShotSegmenter

        modelsDir = settings.modelsFolder or None
        clip = models.load_clip(
            settings.clipModelId or models.DEFAULT_CLIP_ID, device=settings.device, models_dir=modelsDir
        )
        sam = models.load_sam(
            settings.samType,
            checkpoint=settings.samCheckpoint or None,
            device=settings.device,
            models_dir=modelsDir,
            progress=progress,
        )
        config = ZeroShotConfig(
            top_k=settings.topK,
            crf_tau=settings.crfTau,
            crf_iterations=settings.crfIterations,
            crf_bilateral_sxy=settings.crfBilateralSxy,
            crf_bilateral_srgb=settings.crfBilateralSrgb,
            presence_threshold=settings.presenceThreshold,
            precision=settings.precision,
        )
        return ZeroShotSegmenter(clip, sam, config)

    @staticmethod
    def _buildWeakSegmenter(settings: SegmenterSettings):
        from MedCLIPSAMLib.weak.predict import WeakSegmenter

        return WeakSegmenter(settings.weakModelCheckpoint, device=settings.device)

    # -- Segmentation ----------------------------------------------------------------------------------------------

    def segmentVolume(
        self,
        inputVolumeNode,
        prompt: str,
        segmentationNode=None,
        axis: str = "axial",
        sliceRange: tuple[int, int] | None = None,
        settings: SegmenterSettings | None = None,
        createSaliency: bool = True,
        showSaliency: bool = True,
        partialPolicy: str = PARTIAL_KEEP,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
    ) -> SegmentationOutcome:
        """Segment `inputVolumeNode` slice by slice from a text prompt and write the results into the scene.

        Args:
            inputVolumeNode: Scalar volume; a 2D image stored as a one-slice volume works too.
            prompt: Text naming the target; the segment gets this name.
            segmentationNode: Segmentation to add the segment to; None creates one after the run. A segment with
                the prompt's name is replaced (same id); other segments are not modified.
            axis: Anatomical plane of the slices: "axial", "coronal" or "sagittal". The volume is sliced along its
                array axis closest to that plane's normal; a one-slice volume is always sliced in its own plane.
            sliceRange: Half-open range (start, stop) of slice indices along the chosen axis; None for all.
            settings: Models and pipeline parameters; None uses the cached segmenter or the defaults.
            createSaliency: Write the saliency (zero-shot) or probability (weak network) as a float volume.
            showSaliency: Show that volume as the slice views' foreground with a heat colour table, when views
                exist.
            partialPolicy: After a cancel, "keep" writes what was processed as a segment named
                "<prompt> (partial, slices a-b)"; "discard" writes nothing.
            progress: Called as progress(done, total, message) after each slice.
            cancel: Polled before each slice; True stops the run.

        Returns:
            SegmentationOutcome with the nodes and the per-slice status.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"The text prompt must be a non-empty string, got {prompt!r}.")
        if partialPolicy not in PARTIAL_POLICIES:
            raise InvalidInputError(f"partialPolicy must be one of {PARTIAL_POLICIES}, got {partialPolicy!r}.")
        if axis not in ANATOMICAL_AXES:
            raise InvalidInputError(f"axis must be one of {sorted(ANATOMICAL_AXES)}, got {axis!r}.")
        if segmentationNode is not None and not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InvalidInputError(f"Output must be a segmentation node, got {segmentationNode.GetClassName()}.")
        prompt = prompt.strip()

        volume = mrml.arrayFromVolumeNode(inputVolumeNode)
        ijkToRas = mrml.ijkToRasArray(inputVolumeNode)
        sliceAxis = slice_axis_for(ijkToRas, axis, volume.shape)
        sliceAxisName = anatomical_axis_of_array_axis(ijkToRas, sliceAxis)
        logger.info(
            "Segmenting %r in %s: %s slices (array axis %d of shape %s).",
            prompt, inputVolumeNode.GetName(), sliceAxisName, sliceAxis, volume.shape,
        )
        segmenter = self.getSegmenter(settings, progress)  # progress also reports a weights download
        result = segmenter.segment_volume(
            volume, prompt, axis=sliceAxis, slice_range=sliceRange, progress=progress, cancel=cancel
        )

        outcome = SegmentationOutcome(
            prompt=prompt,
            segmentationNode=segmentationNode,
            segmentId=None,
            segmentName=None,
            saliencyNode=None,
            sliceAxis=sliceAxis,
            sliceAxisName=sliceAxisName,
            foundSlices=list(result.found_slices),
            notFoundSlices=list(result.not_found_slices),
            skippedSlices=list(result.skipped_slices),
            processedSlices=list(result.processed_slices),
            cancelled=bool(result.cancelled),
        )
        computeType = getattr(segmenter, "compute_dtype", None)
        if computeType is not None:
            outcome.precision = str(computeType).replace("torch.", "")
        if result.cancelled and (partialPolicy == PARTIAL_DISCARD or not result.processed_slices):
            outcome.written = False
            logger.info("Segmentation of %r cancelled; nothing written.", prompt)
            return outcome

        segmentName = prompt
        if result.cancelled:
            processed = sorted(result.processed_slices)
            segmentName = f"{prompt} (partial, slices {processed[0]}-{processed[-1]})"
        self._writeResult(outcome, inputVolumeNode, ijkToRas, result, segmentName, createSaliency, showSaliency)
        logger.info("%s", outcome.summary())
        return outcome

    def _writeResult(self, outcome, inputVolumeNode, ijkToRas, result, segmentName, createSaliency, showSaliency):
        """Create or update the segmentation and saliency nodes once the run is over (never mid-run)."""
        segmentationNode = outcome.segmentationNode
        if segmentationNode is None:
            segmentationNode = self.scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{inputVolumeNode.GetName()} MedCLIPSAM")
            )
            segmentationNode.CreateDefaultDisplayNodes()
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolumeNode)
        outcome.segmentationNode = segmentationNode
        outcome.segmentName = segmentName
        outcome.segmentId = mrml.writeSegmentFromMask(segmentationNode, result.mask, ijkToRas, segmentName)
        if outcome.precision is not None:
            # Segment tags are saved in .seg.nrrd files, so the compute type stays with the result.
            segment = segmentationNode.GetSegmentation().GetSegment(outcome.segmentId)
            segment.SetTag(SEGMENT_TAG_PRECISION, outcome.precision)

        if createSaliency:
            saliencyName = f"{segmentName} saliency"
            saliencyNode = self._findSaliencyNode(inputVolumeNode, saliencyName)
            saliency = np.asarray(result.saliency, dtype=np.float32)
            if saliencyNode is None:
                saliencyNode = mrml.addScalarVolumeFromArray(self.scene, saliency, ijkToRas, saliencyName)
                saliencyNode.SetAttribute(_ATTRIBUTE_PROMPT, saliencyName)
                saliencyNode.SetAttribute(_ATTRIBUTE_INPUT, inputVolumeNode.GetID())
            else:
                mrml.updateScalarVolumeFromArray(saliencyNode, saliency, ijkToRas)
            mrml.showVolumeAsHeatMap(saliencyNode)
            outcome.saliencyNode = saliencyNode
            if showSaliency:
                self.showSaliencyInViews(inputVolumeNode, saliencyNode)

    def _findSaliencyNode(self, inputVolumeNode, saliencyName: str):
        """Return the saliency volume an earlier run wrote for this input and name, or None."""
        nodes = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if (
                node.GetAttribute(_ATTRIBUTE_PROMPT) == saliencyName
                and node.GetAttribute(_ATTRIBUTE_INPUT) == inputVolumeNode.GetID()
            ):
                return node
        return None

    def segmentDicomFolder(self, folder, prompts: list[str], outputFolder, **options):
        """Segment every series of a DICOM folder with every prompt and save the files.

        See `MedCLIPSAMModule.batch.segmentDicomFolder` for the options and the returned per-case results.
        """
        from .batch import segmentDicomFolder

        return segmentDicomFolder(self, folder, prompts, outputFolder, **options)

    @staticmethod
    def showSaliencyInViews(backgroundVolumeNode, saliencyNode, opacity: float = SALIENCY_OPACITY) -> bool:
        """Show the saliency volume over the input in every slice view; returns False when there are no views.

        Without a layout manager (slicer-core, or Slicer started with --no-main-window) there is nothing to show.
        """
        application = getattr(slicer, "app", None)
        if application is None or application.layoutManager() is None:
            return False
        slicer.util.setSliceViewerLayers(
            background=backgroundVolumeNode, foreground=saliencyNode, foregroundOpacity=opacity
        )
        return True
