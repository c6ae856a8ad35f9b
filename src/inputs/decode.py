"""Decoding one image: from an ``ImageSource`` to a PIL RGB image, guarded against bombs.

PIL limited to ``IMAGE_FORMATS`` (the types ``sniff`` tells); width*height checked against
MAX_IMAGE_PIXELS right after ``Image.open`` (before pixels load); JPEGs decode in draft mode at
a DCT scale no smaller than ``min_side`` on each side; EXIF orientation applied; first frame of
animations. Colour is converted as LAVIS does (``convert("RGB")``: transparency is dropped, not
composited on white), except 16-bit grayscale, which PIL would clip to white: it is scaled to 8
bits first.
"""
from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from config import ENV, Config
from errors import ImageError

from .sniff import HEAD_BYTES, IMAGE_FORMATS, ZIP, _not_an_image, _reason, sniff

if TYPE_CHECKING:
    from .job_inputs import ImageSource

IMAGE_SIDE = 364  # preprocess.IMAGE_SIZE (not imported: it pulls in torch)

# decode_image rejects images over MAX_IMAGE_PIXELS itself, right after Image.open; PIL's
# warning for images between 1x and 2x its own limit would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# --- decoding --------------------------------------------------------------------------------

def _megapixels(n: int) -> str:
    return f"{n / 1e6:.0f} MP" if n >= 100e6 else f"{n / 1e6:.3g} MP"


def apply_pil_limits(cfg: Config) -> None:
    """Set PIL's process-global bomb guard from cfg (it raises above twice this; we check 1x)."""
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels


def _pixels_text(pixels: int | None, cfg: Config, dims: str = "") -> str:
    size = f"{dims}{_megapixels(pixels)}" if pixels else "too large"
    return (f"image is {size}; the limit is "
            f"{_megapixels(cfg.max_image_pixels)} ({ENV['max_image_pixels']}); resize it")


def _check_pixels(img: Image.Image, cfg: Config) -> None:
    width, height = img.size
    if width * height > cfg.max_image_pixels:
        raise ImageError(_pixels_text(width * height, cfg, f"{width}x{height} = "))


def _image_kind(fp: BinaryIO) -> str:
    head = fp.read(HEAD_BYTES)
    fp.seek(0)
    kind = sniff(head)
    if kind is None or kind == ZIP:
        raise ImageError(_not_an_image(head, len(head)) if kind is None else
                         "not an image: this is a zip inside a zip; zip the images themselves")
    return kind


def _orient(img: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a damaged EXIF block costs the rotation, not the image
        pass


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as LAVIS (``convert("RGB")``), but 16-bit grayscale is scaled to 8 bits first:
    PIL's conversion would clip every value above 255 to white."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        img = img.convert("I").point(lambda v: v / 256)
    if getattr(img, "is_animated", False):
        img = img.copy()  # frame 0 only, detached from the file
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(fp: BinaryIO, cfg: Config, min_side: int) -> Image.Image:
    img = Image.open(fp, formats=IMAGE_FORMATS)
    _check_pixels(img, cfg)  # before any pixel is decoded
    if isinstance(img, JpegImagePlugin.JpegImageFile):
        img.draft("RGB", (min_side, min_side))  # DCT scaling; each side stays >= min_side
    img.load()
    _orient(img)
    return _to_rgb(img)


def _unreadable(exc: BaseException, kind: str) -> str:
    if isinstance(exc, (zipfile.BadZipFile, zlib.error)):
        return f"damaged zip member ({_reason(exc)}); create the zip again"
    if isinstance(exc, UnidentifiedImageError):
        return f"not a readable image: the data is not a valid {kind} file"
    return (f"not a readable image: truncated or corrupt {kind} data ({_reason(exc)}); "
            "export the image again")


def decode_image(src: ImageSource, cfg: Config, min_side: int = IMAGE_SIDE) -> Image.Image:
    """Open, guard, draft, decode, orient, take the first frame, convert to RGB. Thread-safe.

    Raises ``ImageError`` naming what is wrong, e.g. ``not a readable image: truncated or
    corrupt JPEG data (...)`` or ``image is 50000x50000 = 2500 MP; the limit is 120 MP
    (MAX_IMAGE_PIXELS); resize it``.
    """
    apply_pil_limits(cfg)
    kind = "image"
    try:
        with src.open() as fp:
            kind = _image_kind(fp)
            return _decode(fp, cfg, min_side)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refused in open()
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(_pixels_text(int(pixels[1]) if pixels else None, cfg)) from None
    except Exception as exc:  # hostile data makes PIL's decoders raise many types; one bad
        raise ImageError(_unreadable(exc, kind)) from None  # image must not fail the job
