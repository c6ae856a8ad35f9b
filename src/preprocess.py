"""Image preprocessing: exactly LAVIS ``blip_image_eval`` at 364 px, without torchvision.

LAVIS (caption_coco_opt2.7b, eval): ``Resize((364, 364), BICUBIC)`` on the PIL image (aspect
ratio ignored), ``ToTensor()`` (scale to [0, 1]), ``Normalize(CLIP mean, CLIP std)``.

The work is split so the expensive part runs on CPU worker threads and the cheap part on the GPU:
- ``to_uint8(img)``: RGB convert + bicubic resize with PIL, as a ``uint8`` CHW tensor (CPU,
  thread-safe; PIL releases the GIL while resizing). Sending uint8 moves 4x fewer bytes to the GPU.
  With a GPU the tensor is written into pinned memory, so the GPU thread copies each image
  asynchronously instead of stacking and pinning the batch itself.
- ``normalize(batch)``: uint8 NCHW -> float32 in [0, 1] -> (x - mean) / std -> target dtype, on
  whatever device the batch is on. Same float32 arithmetic as torchvision's ToTensor + Normalize.
"""
from __future__ import annotations

import torch
from PIL import Image

IMAGE_SIZE = 364
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resize(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB, size x size, bicubic; aspect ratio ignored (as LAVIS)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def to_uint8(img: Image.Image, size: int = IMAGE_SIZE, pin: bool = False) -> torch.Tensor:
    """PIL image -> uint8 tensor of shape (3, size, size). ``pin``: written straight into
    page-locked memory (needs CUDA), so it can go to the GPU without a staging copy."""
    img = resize(img, size)
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    out = torch.empty((3, size, size), dtype=torch.uint8, pin_memory=pin)
    return out.copy_(hwc.permute(2, 0, 1))


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float tensor in ``dtype`` on the batch's device."""
    x = batch.to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).to(dtype)


def to_tensor(img: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL image -> normalised float32 tensor (3, size, size): the full LAVIS eval transform."""
    return normalize(to_uint8(img, size).unsqueeze(0))[0]
