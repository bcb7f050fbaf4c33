"""MedCLIPSAMLib: zero-shot text-prompt segmentation of medical images (MedCLIP-SAM).

The library is pure Python plus torch and never imports slicer, qt, ctk or vtk. The Slicer module in
MedCLIPSAM/ and the `medclipsam` command both call it.
"""

__version__ = "0.1.0"
