"""One error shape for the whole worker.

- ``JobError``: the job fails as a whole. The handler returns ``{"error": message}`` and RunPod
  marks the job FAILED. Raised for invalid parameters, an unreachable single source, a zip over
  its limits, or nothing left to caption.
- ``ImageError``: one image fails; it becomes ``{"image_path": ..., "error": message}`` in the
  output's ``errors`` list and every other image still gets its caption.

Messages are written for the person who sent the job: they say what is wrong and how to fix it,
name the field or the image, and never echo the input (which can be megabytes of base64).
"""
from __future__ import annotations


class JobError(Exception):
    """The whole job fails with this readable message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ImageError(Exception):
    """One image fails with this readable message; the rest of the job goes on."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says which setting to change and how."""


class FatalDeviceError(RuntimeError):
    """The GPU is in a state no job can recover from; RunPod must replace the worker."""
