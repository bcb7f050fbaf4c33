"""Exception types that the library raises for problems a user can fix."""


class MedCLIPSAMError(Exception):
    """Base class of every error that MedCLIPSAMLib raises on purpose."""


class InvalidInputError(MedCLIPSAMError, ValueError):
    """An image, volume, prompt or parameter that the pipeline cannot use."""


class WeightsError(MedCLIPSAMError, RuntimeError):
    """Model weights that are missing, partial, corrupt or cannot be downloaded."""


class CancelledError(MedCLIPSAMError):
    """A long run that the caller cancelled through its cancel callback."""
