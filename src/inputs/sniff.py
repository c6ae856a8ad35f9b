"""Type detection from the first bytes (magic numbers), and the sink that writes one source to
its file while enforcing the size cap of the type it learns.

- The type comes from the content (magic bytes), never from the URL or Content-Type. The size
  cap is enforced while streaming: the larger of MAX_IMAGE_BYTES / MAX_ZIP_BYTES until the first
  bytes tell the type, then that type's cap; reading stops at the cap whatever Content-Length
  said. Files are streamed into the job directory, named by source index, never held in memory.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import BinaryIO

from config import ENV, Config
from errors import ImageError
from text import FORMAT_LIST, human_size, printable, short

HEAD_BYTES = 16  # enough to tell every supported type apart
B64_CHUNK = 1 << 20  # base64 characters decoded at a time (a multiple of 4)
_WHITESPACE = (" ", "\n", "\r", "\t", "\f", "\v")  # what line-wrapped base64 may contain

ZIP = "ZIP"
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")  # PIL format names
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"PK\x03\x04", ZIP), (b"PK\x05\x06", ZIP))


# --- small helpers ---------------------------------------------------------------------------

def sniff(head: bytes) -> str | None:
    """The type of a file from its first bytes: ZIP, a PIL format name, or None."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _reason(exc: BaseException) -> str:
    """A short, path-free description of an exception."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return short(printable(text), 100)


def _base64_reason(exc: binascii.Error) -> str:
    """binascii's message in the user's terms."""
    text = str(exc)
    if "Only base64 data" in text:
        return "it holds a character outside the standard alphabet A-Z a-z 0-9 + / ="
    if "padding" in text or "multiple of 4" in text:
        return "its length is wrong: cut short, or '=' padding missing"
    return text


def _not_an_image(head: bytes, size: int) -> str:
    if size == 0:
        return "the file is empty (0 bytes); check that the source holds the image"
    if head.lstrip()[:1] == b"<":
        return ("not an image or a zip: the content looks like HTML or XML (an error page?); "
                "the URL must point at the image file itself")
    return f"not an image or a zip: the content is not {FORMAT_LIST}, nor a zip of them"


def _too_large(kind: str | None, cfg: Config) -> str:
    if kind == ZIP:
        return (f"the zip is larger than {human_size(cfg.max_zip_bytes)} "
                f"({ENV['max_zip_bytes']}); split it into several jobs")
    if kind is not None:
        return (f"the image is larger than {human_size(cfg.max_image_bytes)} "
                f"({ENV['max_image_bytes']}); send a smaller image")
    return (f"the file is larger than {human_size(max(cfg.max_image_bytes, cfg.max_zip_bytes))} "
            f"({ENV['max_image_bytes']} / {ENV['max_zip_bytes']})")


# --- writing one source to its file ----------------------------------------------------------

class _Sink:
    """Writes one source's bytes to a file, learns the type from the first bytes and enforces
    the size cap of that type while writing, so a lying or absent Content-Length cannot matter."""

    def __init__(self, file: BinaryIO, cfg: Config, declared: int | None = None):
        self._file, self._cfg, self._declared = file, cfg, declared or 0
        self._head = b""
        self.kind: str | None = None
        self.total = 0

    @property
    def cap(self) -> int:
        if self.kind is None:
            return max(self._cfg.max_image_bytes, self._cfg.max_zip_bytes)
        return self._cfg.max_zip_bytes if self.kind == ZIP else self._cfg.max_image_bytes

    def room(self) -> int:
        """The most bytes worth reading next: one past the cap proves the cap is exceeded."""
        return self.cap - self.total + 1

    def write(self, chunk: bytes) -> None:
        if self.kind is None and len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
            if len(self._head) == HEAD_BYTES:
                self._learn()
        self.total += len(chunk)
        if max(self.total, self._declared) > self.cap:
            raise ImageError(_too_large(self.kind, self._cfg))
        self._file.write(chunk)

    def _learn(self) -> None:
        self.kind = sniff(self._head)
        if self.kind is None:
            raise ImageError(_not_an_image(self._head, self.total + len(self._head)))

    def finish(self) -> str:
        if self.kind is None:  # shorter than HEAD_BYTES
            self._learn()
        assert self.kind is not None
        return self.kind


def _save_data_uri(uri: str, path: str, cfg: Config) -> str:
    """Decode a base64 data: URI into ``path`` in slices (bounded memory); return its type."""
    payload = uri.split(",", 1)[1]
    if any(ws in payload for ws in _WHITESPACE):  # substring scans: fast on megabytes
        payload = re.sub(r"\s+", "", payload)
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    with open(path, "wb") as file:
        sink = _Sink(file, cfg, declared=size)
        for start in range(0, len(payload), B64_CHUNK):
            try:
                data = base64.b64decode(payload[start:start + B64_CHUNK], validate=True)
            except binascii.Error as exc:
                raise ImageError(f"the data: URI is not valid base64 ({_base64_reason(exc)}); "
                                 "encode the file with standard base64") from None
            sink.write(data)
        return sink.finish()
