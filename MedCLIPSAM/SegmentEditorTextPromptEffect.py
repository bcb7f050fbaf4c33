"""Hidden Slicer module that registers the "Text prompt" Segment Editor effect once Slicer has started.

Slicer loads every .py file of a scripted-module folder as a module, so the effect class lives in
SegmentEditorTextPromptEffectLib/ and this file only registers it.
"""

from __future__ import annotations

import os

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class SegmentEditorTextPromptEffect(ScriptedLoadableModule):
    """Registers the "Text prompt" effect; hidden from the module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segment Editor Text Prompt Effect")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedCLIPSAM developers"]
        self.parent.hidden = True
        self.parent.helpText = _("Adds the \"Text prompt\" effect to the Segment Editor.")
        self.parent.acknowledgementText = ""
        slicer.app.connect("startupCompleted()", registerEffect)


def registerEffect() -> None:
    """Create the scripted effect from SegmentEditorTextPromptEffectLib/SegmentEditorEffect.py and register it."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effectPath = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "SegmentEditorTextPromptEffectLib", "SegmentEditorEffect.py"
    )
    scriptedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
    scriptedEffect.setPythonSource(effectPath.replace("\\", "/"))
    scriptedEffect.self().register()
