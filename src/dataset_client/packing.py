"""Inline files: each local file as a base64 ``data:`` URI, pre-resized as the worker would, and
the /run body measured as the SDK sends it.

- Pre-resize (default on; ``--no-preresize``): the worker's own decoding (``inputs.
  decode_image``: EXIF orientation, RGB, JPEG draft) and resize (``preprocess.resize``, bicubic
  to ``--image-size``, 364 = the endpoint model's input) then lossless WebP, so the worker sees
  exactly the pixels it would have made from the original and the captions are the same. The
  smaller of the two encodings is sent (a small JPEG beats any lossless 364x364 image), and
  files up to ``RAW_FLOOR`` (64 KiB) are sent as they are without decoding. A file the client
  cannot decode is sent as it is, so the worker gives its own verdict.
"""
from __future__ import annotations

import base64
import io
import json
import mimetypes
from functools import partial
from typing import Any, Sequence

from config import Config
from errors import ImageError
from inputs import ImageSource, decode_image

from .work import Item, Prepared

MAX_BODY_BYTES = 10_000_000  # RunPod's /run body limit
RAW_FLOOR = 64 * 1024  # files this small are sent as they are: no lossless 364 px image is smaller


def json_len(value: Any) -> int:
    """Bytes ``value`` takes in the /run body (requests sends ``json.dumps(body)``, ASCII)."""
    return len(json.dumps(value))


def envelope_bytes(fields: dict) -> int:
    """The body's size with an empty ``data_urls`` list."""
    return json_len({"input": {**fields, "data_urls": []}})


def body_bytes(envelope: int, entry_sizes: Sequence[int]) -> int:
    """Exact size of the body with these entries: ``[a, b]`` adds each entry plus ", " between."""
    return envelope + sum(entry_sizes) + 2 * max(len(entry_sizes) - 1, 0)


def preresize_bytes(raw: bytes, name: str, size: int, cfg: Config) -> bytes:
    """The pixels the worker would feed the model, as lossless WebP. Raises ImageError."""
    from preprocess import resize  # imports torch: only when pre-resizing
    src = ImageSource((0, 0), name, partial(io.BytesIO, raw))
    img = resize(decode_image(src, cfg, size), size)
    img.info.clear()  # no EXIF orientation, transparency or ICC carried into the copy
    buf = io.BytesIO()
    img.save(buf, "WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def too_large(name: str, body: int, limit: int, preresized: bool, preresize: bool) -> str:
    how = "pre-resized" if preresized else "sent as it is" + (
        "" if preresize else " (--no-preresize)")
    todo = "" if preresize else "drop --no-preresize, or "
    whose = ("RunPod's " if limit == MAX_BODY_BYTES else "the ") + f"{limit:,}-byte /run body limit"
    if limit != MAX_BODY_BYTES:
        whose += " (--max-body-bytes)"
    return (f"too large to send inline: as a data: URI it makes a {body:,}-byte /run request "
            f"body ({how}), over {whose}; {todo}host the "
            "image and pass a URL list (.txt, .csv or .jsonl), or put it in a bucket and pass "
            "s3://bucket/prefix")


def prepare_file(item: Item, preresize: bool, size: int, cfg: Config, envelope: int,
                 limit: int) -> Prepared:
    """Read (and pre-resize) one local file into its data: URI. Thread-safe."""
    try:
        with open(item.ref, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        return Prepared("", 0, error=f"could not read the file ({exc.strerror or exc})")
    data, mime, done = raw, mimetypes.guess_type(item.ref)[0] or "application/octet-stream", False
    if preresize and len(raw) > RAW_FLOOR:
        try:
            small = preresize_bytes(raw, item.source, size, cfg)
        except ImageError:
            small = None  # sent as it is: the worker gives its own verdict
        if small is not None and len(small) < len(raw):
            data, mime, done = small, "image/webp", True
    entry = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    prepared = Prepared(entry, json_len(entry), len(raw), len(data), done)
    if body_bytes(envelope, [prepared.entry_bytes]) > limit:
        return Prepared("", 0, len(raw), error=too_large(
            item.source, body_bytes(envelope, [prepared.entry_bytes]), limit, done, preresize))
    return prepared
