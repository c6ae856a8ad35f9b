from .decode import apply_pil_limits, decode_image
from .job_inputs import ImageFailure, ImageSource, JobInputs
from .sniff import IMAGE_FORMATS

__all__ = ["IMAGE_FORMATS", "ImageFailure", "ImageSource", "JobInputs", "apply_pil_limits",
           "decode_image"]
