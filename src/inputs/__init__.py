"""Inputs: from a job's sources (URLs, data: URIs, zips of images) to decoded RGB images.

``JobInputs(sources, single, cfg)`` fetches one job's sources into a private directory and
yields its images (``ImageSource``) and failed images (``ImageFailure``) as they become ready;
``decode_image(src, cfg)`` turns an ``ImageSource`` into a PIL RGB image (thread-safe).

The modules, each documenting its rules; each imports only modules below it (``decode``
names ``ImageSource`` for an annotation only):
- ``job_inputs``: ``JobInputs`` and the items it yields; labels, the per-job image limit.
- ``download``: one URL to a file (SSRF guard, timeouts, deadline and low-speed watchdog,
  retries).
- ``zips``: which zip members are images; the zip limits, from the central directory.
- ``decode``: one image to RGB (pixel guard, JPEG draft, orientation, 16-bit grayscale).
- ``sniff``: the type from the first bytes, and the sink that caps a file while writing it.

No torch and no model code here.
"""
from .decode import apply_pil_limits, decode_image
from .job_inputs import ImageFailure, ImageSource, JobInputs
from .sniff import IMAGE_FORMATS

__all__ = ["IMAGE_FORMATS", "ImageFailure", "ImageSource", "JobInputs", "apply_pil_limits",
           "decode_image"]
