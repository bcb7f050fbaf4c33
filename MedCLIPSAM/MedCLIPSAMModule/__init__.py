"""Qt-free parts of the MedCLIPSAM Slicer module: MRML conversion, Logic, DICOM batch and the self-test body.

Everything here imports only `slicer` (MRML, works with the slicer-core wheel), `vtk`, numpy and MedCLIPSAMLib,
so that the Logic runs from Slicer's Python console, from scripts and in pytest without a Slicer application.
"""
