"""Preprocessing equals LAVIS blip_image_eval at 364 px, computed independently with numpy."""
import numpy as np
import pytest
import torch
from PIL import Image

import preprocess

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def numpy_reference(img: Image.Image) -> np.ndarray:
    """ToTensor + Normalize, written from the definitions: HWC uint8 -> CHW float32."""
    rgb = img.convert("RGB").resize((364, 364), Image.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    arr = (arr - MEAN) / STD
    return arr.transpose(2, 0, 1)


def photo_like(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB").convert(mode)


@pytest.mark.parametrize("size,mode", [((640, 480), "RGB"), ((300, 500), "RGB"),
                                       ((364, 364), "RGB"), ((1000, 20), "L"),
                                       ((123, 77), "RGBA"), ((200, 200), "P"),
                                       ((200, 150), "CMYK")])
def test_matches_independent_numpy_computation(size, mode):
    img = photo_like(*size, mode=mode, seed=size[0])
    ours = preprocess.to_tensor(img)
    assert ours.shape == (3, 364, 364) and ours.dtype == torch.float32
    ref = numpy_reference(img)
    assert np.abs(ours.numpy() - ref).max() <= 1e-5


def test_uint8_then_normalize_is_the_same_path_in_other_dtypes():
    img = photo_like(640, 480, seed=3)
    u8 = preprocess.to_uint8(img)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 364, 364)
    full = preprocess.normalize(u8.unsqueeze(0))[0]
    half = preprocess.normalize(u8.unsqueeze(0), torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05  # only bf16 rounding


def test_aspect_ratio_is_ignored_like_lavis():
    # A wide image is squeezed, not cropped: the left and right edges both survive.
    img = Image.new("RGB", (1000, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 100, 100))
    img.paste((0, 0, 255), (900, 0, 1000, 100))
    u8 = preprocess.to_uint8(img)
    assert u8[0, 182, 5] > 200 and u8[2, 182, 358] > 200
