"""Segment Editor effect "Text prompt": fill the selected segment from a typed prompt.

The effect segments the source volume on the slice shown in a chosen slice view, or on every slice. It uses the
Logic and the model settings of the MedCLIPSAM module (its Advanced section). The mask goes into the selected segment
through the editor, so the editable area, the overwrite settings and undo all apply.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import qt

import slicer
from slicer.i18n import tr as _
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

logger = logging.getLogger(__name__)

SCOPE_SLICE = "slice"
SCOPE_VOLUME = "volume"
SLICE_VIEW_NAMES = ("Red", "Yellow", "Green")


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Text-prompt segmentation of the selected segment (current slice or whole volume)."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Text prompt"
        scriptedEffect.title = _("Text prompt")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._logic = None
        self._promptSegmentId = None
        self._cancelRequested = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        moduleFolder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        iconPath = os.path.join(moduleFolder, "Resources", "Icons", "MedCLIPSAM.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return _(
            "<html>Fill the selected segment with the structure named by a text prompt (BiomedCLIP + SAM, "
            "zero-shot).<p>Choose <b>Current slice</b> to segment the slice shown in a slice view, or <b>Whole "
            "volume</b> to segment every slice (in the module's slice plane). Models and pipeline settings come from the MedCLIPSAM module's "
            "Advanced section. The editable area and overwrite settings below apply; Undo restores the segment."
            "</html>"
        )

    def setupOptionsFrame(self):
        self.promptLineEdit = qt.QLineEdit()
        self.promptLineEdit.placeholderText = _("e.g. liver")
        self.promptLineEdit.toolTip = _("Text naming the structure; prefilled from the segment name.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Prompt:"), self.promptLineEdit)

        self.scopeComboBox = qt.QComboBox()
        self.scopeComboBox.addItem(_("Current slice"), SCOPE_SLICE)
        self.scopeComboBox.addItem(_("Whole volume"), SCOPE_VOLUME)
        self.scriptedEffect.addLabeledOptionsWidget(_("Apply to:"), self.scopeComboBox)

        self.viewComboBox = qt.QComboBox()
        for viewName in SLICE_VIEW_NAMES:
            self.viewComboBox.addItem(viewName)
        self.viewComboBox.toolTip = _("Slice view whose current slice is segmented.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Slice view:"), self.viewComboBox)

        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.toolTip = _("Segment and fill the selected segment.")
        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.enabled = False
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.applyButton)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.promptLineEdit.connect("returnPressed()", self.onApply)
        self.scopeComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.viewComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Scope", SCOPE_SLICE)
        self.scriptedEffect.setParameterDefault("SliceView", SLICE_VIEW_NAMES[0])

    def updateGUIFromMRML(self):
        scope = self.scriptedEffect.parameter("Scope")
        self.scopeComboBox.setCurrentIndex(max(0, self.scopeComboBox.findData(scope)))
        self.viewComboBox.setCurrentIndex(max(0, self.viewComboBox.findText(self.scriptedEffect.parameter("SliceView"))))
        self.viewComboBox.enabled = scope == SCOPE_SLICE
        self._prefillPrompt()

    def updateMRMLFromGUI(self, *args):
        self.scriptedEffect.setParameter("Scope", self.scopeComboBox.currentData)
        self.scriptedEffect.setParameter("SliceView", self.viewComboBox.currentText)
        self.viewComboBox.enabled = self.scopeComboBox.currentData == SCOPE_SLICE

    def _prefillPrompt(self):
        """Put the selected segment's name in the prompt box when the selection changes."""
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode() if parameterSetNode else None
        segmentId = parameterSetNode.GetSelectedSegmentID() if parameterSetNode else None
        if not segmentationNode or not segmentId or segmentId == self._promptSegmentId:
            return
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is not None:
            self.promptLineEdit.text = segment.GetName()
            self._promptSegmentId = segmentId

    @staticmethod
    def _sourceVolumeNode(parameterSetNode):
        # Slicer 5.4 renamed the "master" volume to "source" volume.
        if hasattr(parameterSetNode, "GetSourceVolumeNode"):
            return parameterSetNode.GetSourceVolumeNode()
        return parameterSetNode.GetMasterVolumeNode()

    def _currentSlice(self, ijkToRas: np.ndarray, shape: tuple[int, int, int]) -> tuple[int, int]:
        """Return (array axis, slice index) of the source volume closest to the chosen slice view's plane."""
        from MedCLIPSAMLib.errors import InvalidInputError
        from MedCLIPSAMLib.geometry import array_axis_closest_to

        viewName = self.viewComboBox.currentText
        sliceWidget = slicer.app.layoutManager().sliceWidget(viewName)
        if sliceWidget is None:
            raise InvalidInputError(_("Slice view {name} is not in the current layout.").format(name=viewName))
        sliceToRas = slicer.util.arrayFromVTKMatrix(sliceWidget.mrmlSliceNode().GetSliceToRAS())
        axis = array_axis_closest_to(ijkToRas, sliceToRas[:3, 2])
        centerIjk = np.linalg.inv(ijkToRas) @ sliceToRas[:, 3]
        index = int(round(float(centerIjk[2 - axis])))  # array axis a is IJK index 2 - a
        if not 0 <= index < shape[axis]:
            raise InvalidInputError(
                _("The {name} view shows no slice of the source volume; move it into the volume.").format(name=viewName)
            )
        return axis, index

    def onCancel(self):
        self._cancelRequested = True

    def _onProgress(self, done: int, total: int, message: str) -> None:
        self.statusLabel.text = f"{done}/{total}: {message}"
        slicer.app.processEvents()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Text-prompt segmentation failed."), waitCursor=True):
            self._apply()

    def _apply(self):
        from MedCLIPSAM import MedCLIPSAMLogic, ensureDependencies, settingsFromParameterNode
        from MedCLIPSAMModule import mrml

        prompt = self.promptLineEdit.text.strip()
        if not prompt:
            self.statusLabel.text = _("Type a prompt first.")
            return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        sourceVolumeNode = self._sourceVolumeNode(parameterSetNode)
        if sourceVolumeNode is None:
            self.statusLabel.text = _("Select a source volume first.")
            return
        if not ensureDependencies():
            return
        if self._logic is None:
            self._logic = MedCLIPSAMLogic()
        moduleParameters = self._logic.getParameterNode()
        segmenter = self._logic.getSegmenter(settingsFromParameterNode(moduleParameters))

        volume = mrml.arrayFromVolumeNode(sourceVolumeNode)
        ijkToRas = mrml.ijkToRasArray(sourceVolumeNode)
        sliceExtent = None
        if self.scopeComboBox.currentData == SCOPE_SLICE:
            axis, index = self._currentSlice(ijkToRas, volume.shape)
            sliceRange = (index, index + 1)
            sliceExtent = [0, volume.shape[2] - 1, 0, volume.shape[1] - 1, 0, volume.shape[0] - 1]
            sliceExtent[2 * (2 - axis)] = sliceExtent[2 * (2 - axis) + 1] = index  # only this slice is modified
        else:
            from MedCLIPSAMLib.geometry import slice_axis_for

            axis = slice_axis_for(ijkToRas, moduleParameters.axis, volume.shape)
            sliceRange = None

        self._cancelRequested = False
        self.applyButton.enabled = False
        self.cancelButton.enabled = True
        try:
            result = segmenter.segment_volume(
                volume, prompt, axis=axis, slice_range=sliceRange, progress=self._onProgress,
                cancel=lambda: self._cancelRequested,
            )
        finally:
            self.applyButton.enabled = True
            self.cancelButton.enabled = False
        if result.cancelled:
            self.statusLabel.text = _("Cancelled; the segment was not changed.")
            return

        # The editor expects the modifier in the segmentation's geometry (usually the source volume's, but it
        # can be oversampled or differ), so resample the mask onto the editor's default modifier labelmap.
        resultLabelmap = mrml.orientedImageFromMask(result.mask, ijkToRas)
        modifierLabelmap = self.scriptedEffect.defaultModifierLabelmap()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            resultLabelmap, modifierLabelmap, modifierLabelmap
        )
        self.scriptedEffect.saveStateForUndo()
        mode = slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet
        if sliceExtent is not None:
            extent = mrml.extentInLabelmap(sliceExtent, ijkToRas, modifierLabelmap)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifierLabelmap, mode, extent)
        else:
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifierLabelmap, mode)
        found = len(result.found_slices)
        self.statusLabel.text = _("{prompt}: found on {found} of {total} slices.").format(
            prompt=prompt, found=found, total=len(result.processed_slices)
        )
