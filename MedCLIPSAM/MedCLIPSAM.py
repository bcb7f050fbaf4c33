"""MedCLIPSAM Slicer module: segment anatomy and pathology from a typed text prompt (BiomedCLIP + SAM, zero-shot).

The Qt-free Logic lives in MedCLIPSAMModule, usable from the Python console and on slicer-core. This file contains
the module description, the panel (Widget), the parameter node, the dependency installer and the self-test class.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_FOLDER = os.path.dirname(os.path.abspath(__file__))
# Installed extension: MedCLIPSAMLib sits next to this file. Source tree: it sits one folder up.
if not os.path.isdir(os.path.join(_MODULE_FOLDER, "MedCLIPSAMLib")):
    _REPOSITORY_FOLDER = os.path.dirname(_MODULE_FOLDER)
    if os.path.isdir(os.path.join(_REPOSITORY_FOLDER, "MedCLIPSAMLib")) and _REPOSITORY_FOLDER not in sys.path:
        sys.path.append(_REPOSITORY_FOLDER)

from MedCLIPSAMModule import logic as _logic  # noqa: E402  (needs the path set-up above)
from MedCLIPSAMModule.logic import PARTIAL_DISCARD, PARTIAL_KEEP, SegmenterSettings  # noqa: E402

logger = logging.getLogger(__name__)

AXIS_CHOICES = ("axial", "coronal", "sagittal")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
SAM_TYPE_CHOICES = ("vit_b", "vit_l", "vit_h", "medsam")
PRECISION_CHOICES = ("auto", "float32", "bfloat16")

# Packages that Slicer itself ships: pip must never replace them while installing our requirements.
_SLICER_OWNED_PACKAGES = ("numpy", "scipy", "SimpleITK", "requests", "pydicom", "torch", "torchvision")

_SAMPLE_IMAGES = (
    # (sample name, file in Resources/SampleData, node name)
    ("MedCLIPSAMBreastUltrasound", "breast_ultrasound_benign_101.png", "BreastUltrasound"),
    ("MedCLIPSAMBrainMRI", "brain_mri_13.png", "BrainMRI"),
    ("MedCLIPSAMChestXray", "chest_xray_pneumocystis_cyst.jpg", "ChestXray"),
)


def _resourceFile(*parts: str) -> str | None:
    """Find a file of the top-level Resources folder: installed next to the module, or in the source tree."""
    for base in (os.path.join(_MODULE_FOLDER, "Resources"), os.path.join(os.path.dirname(_MODULE_FOLDER), "Resources")):
        path = os.path.join(base, *parts)
        if os.path.exists(path):
            return path
    return None


#
# MedCLIPSAM
#


class MedCLIPSAM(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedCLIPSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedCLIPSAM developers"]
        self.parent.helpText = _(
            "Segment a structure named by a text prompt, zero-shot: BiomedCLIP gScoreCAM saliency, a dense CRF and "
            "SAM box prompts, slice by slice. The saliency volume shows what the prompt matched. "
            "The Segment Editor gets a \"Text prompt\" effect that fills the selected segment."
        )
        self.parent.acknowledgementText = _(
            "Method: Koleilat, Asgariandehkordi, Rivaz and Xiao, \"MedCLIP-SAM: Bridging Text and Image Towards "
            "Universal Medical Image Segmentation\", MICCAI 2024. Models: BiomedCLIP (Microsoft, MIT licence) and "
            "Segment Anything (Meta, Apache 2.0)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the bundled sample images to the Sample Data module (after start-up, when that module exists)."""
    try:
        import SampleData
    except ImportError:
        return
    iconPath = os.path.join(_MODULE_FOLDER, "Resources", "Icons", "MedCLIPSAM.png")
    for sampleName, fileName, nodeName in _SAMPLE_IMAGES:
        path = _resourceFile("SampleData", fileName)
        if path is None:
            logger.warning("Sample image %s not found; it is not registered.", fileName)
            continue
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="MedCLIPSAM",
            sampleName=sampleName,
            thumbnailFileName=iconPath,
            uris=qt.QUrl.fromLocalFile(path).toString(),
            fileNames=fileName,
            nodeNames=nodeName,
            loadFileType="VolumeFile",
        )


#
# Dependencies
#


def _writeConstraints() -> str:
    """Write a pip constraints file pinning Slicer's own packages to their installed versions; returns its path."""
    from importlib import metadata

    lines = []
    for name in _SLICER_OWNED_PACKAGES:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    path = os.path.join(slicer.app.temporaryPath, "MedCLIPSAM-constraints.txt")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return path


def _missingRequirements(path: str) -> list[str]:
    """Return the requirement lines of `path` that the running Python does not satisfy."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            requirement = Requirement(text)
            try:
                installed = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                missing.append(text)
                continue
            if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
                missing.append(text)
    return missing


def _torchAvailable() -> bool:
    """Return True when torch can be imported (Slicer's PyTorch extension has installed it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def ensureDependencies() -> bool:
    """Install torch (through the PyTorch extension) and the Python requirements, after one confirmation.

    Called on the first Apply, never at import or start-up. Returns False when the user declined. On Slicer 5.12
    and later with torch present, `slicer.packaging.pip_ensure` shows the confirmation itself. Otherwise one
    dialog lists everything that is missing before anything is installed.
    """
    requirementsPath = _resourceFile("requirements.txt")
    if requirementsPath is None:
        raise RuntimeError(_("Resources/requirements.txt of MedCLIPSAM is missing; reinstall the extension."))
    needsTorch = not _torchAvailable()
    missing = _missingRequirements(requirementsPath)
    if not needsTorch and not missing:
        return True

    constraintsPath = _writeConstraints()
    if not needsTorch and (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):
        # "import slicer.packaging" here would make "slicer" a local name of the whole function.
        from slicer import packaging as slicerPackaging

        requirements = slicerPackaging.load_requirements(requirementsPath)
        slicerPackaging.pip_ensure(requirements, constraints=constraintsPath, requester="MedCLIPSAM")
        return not _missingRequirements(requirementsPath)

    if needsTorch:
        try:
            import PyTorchUtils
        except ImportError as error:
            raise RuntimeError(
                _("MedCLIPSAM needs the PyTorch extension: install it from the Extensions Manager and restart Slicer.")
            ) from error
    packages = (["torch, torchvision (PyTorch extension)"] if needsTorch else []) + missing
    message = _(
        "MedCLIPSAM needs these Python packages:\n{packages}\n\n"
        "The download can be large (PyTorch with CUDA support takes several GB). Install them now?"
    ).format(packages="\n".join(packages))
    if not slicer.util.confirmOkCancelDisplay(message):
        return False
    with slicer.util.WaitCursor():
        if needsTorch and PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
            raise RuntimeError(_("PyTorch could not be installed; see the Python console for the pip output."))
        if missing:
            slicer.util.pip_install(["-r", requirementsPath, "-c", constraintsPath])
    return not _missingRequirements(requirementsPath)


#
# Parameter node
#


@parameterNodeWrapper
class MedCLIPSAMParameterNode:
    """Settings of the panel, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    prompt: str = ""
    axis: Annotated[str, Choice(list(AXIS_CHOICES))] = "axial"
    outputSegmentation: vtkMRMLSegmentationNode
    showSaliency: bool = True
    keepPartialResults: bool = True
    limitSliceRange: bool = False
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    topK: Annotated[int, WithinRange(1, 768)] = 60
    crfTau: Annotated[float, WithinRange(0.01, 10.0)] = 1.05
    crfIterations: Annotated[int, WithinRange(1, 20)] = 1
    crfBilateralSxy: Annotated[float, WithinRange(1.0, 500.0)] = 60.0
    crfBilateralSrgb: Annotated[float, WithinRange(1.0, 255.0)] = 5.0
    presenceThreshold: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    samType: Annotated[str, Choice(list(SAM_TYPE_CHOICES))] = "vit_b"
    precision: Annotated[str, Choice(list(PRECISION_CHOICES))] = "auto"
    clipModelId: str = ""
    samCheckpoint: str = ""
    modelsFolder: str = ""
    weakModelCheckpoint: str = ""


def settingsFromParameterNode(node: MedCLIPSAMParameterNode) -> SegmenterSettings:
    """Collect the model and pipeline settings of the panel (also used by the "Text prompt" effect)."""
    return SegmenterSettings(
        clipModelId=node.clipModelId.strip(),
        samType=node.samType,
        samCheckpoint=node.samCheckpoint,
        modelsFolder=node.modelsFolder,
        device=node.device,
        topK=node.topK,
        crfTau=node.crfTau,
        crfIterations=node.crfIterations,
        crfBilateralSxy=node.crfBilateralSxy,
        crfBilateralSrgb=node.crfBilateralSrgb,
        presenceThreshold=node.presenceThreshold if node.presenceThreshold > 0 else None,
        weakModelCheckpoint=node.weakModelCheckpoint,
        precision=node.precision,
    )


#
# MedCLIPSAMWidget
#


class MedCLIPSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: collects the parameters, runs the Logic with progress and cancel, reports the result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._running = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedCLIPSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedCLIPSAMLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.promptLineEdit.connect("returnPressed()", self.onApplyButton)
        for pathEdit in (self.ui.samCheckpointPathLineEdit, self.ui.modelsFolderPathLineEdit,
                         self.ui.weakCheckpointPathLineEdit):
            pathEdit.connect("currentPathChanged(QString)", self._onPathChanged)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.ui.samCheckpointPathLineEdit.currentPath = self._parameterNode.samCheckpoint
            self.ui.modelsFolderPathLineEdit.currentPath = self._parameterNode.modelsFolder
            self.ui.weakCheckpointPathLineEdit.currentPath = self._parameterNode.weakModelCheckpoint
            self._checkCanApply()

    def _onPathChanged(self, _path=None) -> None:
        # ctkPathLineEdit has no parameter-node binding: copy the paths by hand.
        if not self._parameterNode:
            return
        self._parameterNode.samCheckpoint = self.ui.samCheckpointPathLineEdit.currentPath
        self._parameterNode.modelsFolder = self.ui.modelsFolderPathLineEdit.currentPath
        self._parameterNode.weakModelCheckpoint = self.ui.weakCheckpointPathLineEdit.currentPath

    def _checkCanApply(self, caller=None, event=None) -> None:
        node = self._parameterNode
        ready = bool(node and node.inputVolume and node.prompt.strip())
        self.ui.applyButton.enabled = ready and not self._running
        if not node or not node.inputVolume:
            self.ui.applyButton.toolTip = _("Select an input volume.")
        elif not node.prompt.strip():
            self.ui.applyButton.toolTip = _("Type a prompt naming the structure, e.g. \"liver\".")
        else:
            self.ui.applyButton.toolTip = _("Segment the structure named by the prompt.")

    def _onProgress(self, done: int, total: int, message: str) -> None:
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = message
        # Synchronous run in the GUI thread: process events so the views update and Cancel can be clicked.
        slicer.app.processEvents()

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        self.ui.parametersCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self._checkCanApply()

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = _("Cancelling after the current slice...")

    def onApplyButton(self) -> None:
        if self._running or not self.ui.applyButton.enabled:
            return
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Text-prompt segmentation failed."), waitCursor=False):
            if not ensureDependencies():
                self.ui.statusLabel.text = _("Dependencies were not installed; nothing was done.")
                return
            sliceRange = None
            if node.limitSliceRange:
                sliceRange = (node.firstSlice, node.lastSlice + 1)  # the panel shows an inclusive range
            self._cancelRequested = False
            self._setRunning(True)
            try:
                outcome = self.logic.segmentVolume(
                    node.inputVolume,
                    node.prompt,
                    segmentationNode=node.outputSegmentation,
                    axis=node.axis,
                    sliceRange=sliceRange,
                    settings=settingsFromParameterNode(node),
                    showSaliency=node.showSaliency,
                    partialPolicy=PARTIAL_KEEP if node.keepPartialResults else PARTIAL_DISCARD,
                    progress=self._onProgress,
                    cancel=lambda: self._cancelRequested,
                )
            finally:
                self._setRunning(False)
            if outcome.segmentationNode is not None:
                node.outputSegmentation = outcome.segmentationNode
                outcome.segmentationNode.CreateDefaultDisplayNodes()
            self.ui.statusLabel.text = outcome.summary()


#
# MedCLIPSAMLogic
#


class MedCLIPSAMLogic(_logic.MedCLIPSAMLogic):
    """The Qt-free Logic plus the typed parameter node of the panel."""

    def getParameterNode(self) -> MedCLIPSAMParameterNode:
        return MedCLIPSAMParameterNode(super().getParameterNode())


#
# MedCLIPSAMTest
#


class MedCLIPSAMTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's testing (`--testing`): the Logic end to end on tiny models, offline."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MedCLIPSAMLogic()

    def test_MedCLIPSAMLogic(self) -> None:
        from MedCLIPSAMModule.selftest import runSelfTest

        self.delayDisplay("Starting the MedCLIPSAM self-test")
        workFolder = slicer.util.tempDirectory("MedCLIPSAMSelfTest")
        runSelfTest(slicer.mrmlScene, workFolder, log=self.delayDisplay)
        self.delayDisplay("MedCLIPSAM self-test passed")
