"""Real images, encoded by PIL.

``picture(seed)`` draws a distinct picture per seed (colours, gradient direction,
shapes and stripes all depend on it), so captioning tests get distinct captions;
``image_bytes(fmt, seed, size, mode)`` encodes one; the special cases (CMYK, 16-bit, palette
with transparency, EXIF rotation, animation, pixel-bomb header, truncation, photo-like) have
their own factories. ``distinct_images(n)``: the set the engine, batcher and decoder tests share
(PIL images of distinct colours, shapes and sizes).
"""
from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Iterable

from PIL import Image, ImageDraw


def _color(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct RGB picture per seed: two-colour gradient (direction by seed), then shapes
    and stripes whose colours, places and kinds all come from the seed."""
    rng = random.Random(seed)
    w, h = size
    mask = Image.linear_gradient("L").rotate(90 * (seed % 4)).resize(size)
    img = Image.composite(Image.new("RGB", size, _color(rng)), Image.new("RGB", size, _color(rng)),
                          mask)
    draw = ImageDraw.Draw(img)
    for _ in range(3 + seed % 4):
        x0, y0 = rng.randrange(max(w, 1)), rng.randrange(max(h, 1))
        box = (x0, y0, x0 + rng.randrange(1, w // 2 + 2), y0 + rng.randrange(1, h // 2 + 2))
        shape = (draw.ellipse, draw.rectangle)[rng.randrange(2)]
        shape(box, fill=_color(rng))
    stripe = max(1, w // (4 + seed % 5))
    for x in range(0, w, stripe * 2):
        draw.line((x, 0, x, h // 4), fill=_color(rng), width=max(1, stripe // 2))
    return img


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def image_bytes(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (64, 48),
                mode: str = "RGB", **params: object) -> bytes:
    """``picture(seed, size)`` in ``mode`` ("L", "LA", "RGBA", "1", "P", ...) encoded as fmt."""
    img = picture(seed, size)
    if mode != "RGB":
        img = img.convert(mode)
    return encode(img, fmt, **params)


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48), **params: object) -> bytes:
    return image_bytes("JPEG", seed, size, **params)


def png(seed: int = 0, size: tuple[int, int] = (64, 48), **params: object) -> bytes:
    return image_bytes("PNG", seed, size, **params)


def cmyk_jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    return image_bytes("JPEG", seed, size, mode="CMYK")


def png16(size: tuple[int, int] = (64, 48)) -> bytes:
    """A 16-bit grayscale PNG (mode I;16): a horizontal ramp over the full 0..65535 range."""
    ramp = Image.linear_gradient("L").rotate(90).resize(size).convert("I")
    return encode(ramp.point(lambda v: v * 257).convert("I;16"), "PNG")


def palette_png_transparent(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A palette PNG whose colour index 0 is transparent."""
    img = picture(seed, size).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def exif_rotated_jpeg(seed: int = 0, size: tuple[int, int] = (80, 40),
                      orientation: int = 6) -> bytes:
    """A JPEG stored ``size`` wide whose EXIF says to rotate it (6 = 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture(seed, size), "JPEG", exif=exif)


def animated_gif(colors: Iterable[tuple[int, int, int]] = ((255, 0, 0), (0, 0, 255)),
                 size: tuple[int, int] = (32, 32)) -> bytes:
    """An animated GIF whose frames are solid ``colors`` (frame 0 first)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                  loop=0)


def truncated_jpeg(seed: int = 0, size: tuple[int, int] = (256, 192), keep: float = 0.5) -> bytes:
    data = jpeg(seed, size)
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def pixel_bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit RGB); the pixel data is a stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def photo(size: tuple[int, int] = (4000, 3000), seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth per-channel gradients, sensor-like noise, soft shapes."""
    rng = random.Random(seed)
    channels = [Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270))).resize(size)
                for _ in range(3)]
    img = Image.merge("RGB", channels)
    noise = Image.effect_noise(size, 24).convert("RGB")
    img = Image.blend(img, noise, 0.15)
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(w // 20, w // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_color(rng))
    return img


def animated(fmt: str = "WEBP", colors: Iterable[tuple[int, int, int]] = ((255, 0, 0), (0, 0, 255)),
             size: tuple[int, int] = (32, 32), **params: object) -> bytes:
    """An animated GIF or WebP (lossless unless ``params`` say otherwise) whose frames are
    solid ``colors`` (frame 0 first)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    if fmt == "WEBP":
        params.setdefault("lossless", True)
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                  **params)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    """A lossless PNG of one colour (e.g. what an animation's first frame must caption as)."""
    return encode(Image.new("RGB", size, color), "PNG")


def upright(data: bytes) -> bytes:
    """The image as a viewer shows it (EXIF orientation applied), as a lossless PNG."""
    from PIL import ImageOps
    return encode(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), "PNG")


def distinct_images(n):
    """Different colours, shapes and sizes: a tiny model must tell them apart."""
    out = []
    for i in range(n):
        im = Image.new("RGB", (320 + 8 * i, 240), ((37 * i) % 256, (91 * i + 50) % 256,
                                                  (173 * i + 20) % 256))
        d = ImageDraw.Draw(im)
        d.ellipse((20 * i % 200, 10, 20 * i % 200 + 80, 120), fill=(255 - (37 * i) % 256, 200, 30))
        d.rectangle((0, 200 - 10 * i, 320, 240), fill=(10 * i, 0, 255 - 10 * i))
        out.append(im)
    return out
