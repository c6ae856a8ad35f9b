from .download import (IMAGE_FORMATS, ImageFailure, ImageSource, JobInputs, apply_pil_limits,
                       decode_image)

__all__ = ["IMAGE_FORMATS", "ImageFailure", "ImageSource", "JobInputs", "apply_pil_limits",
           "decode_image"]
