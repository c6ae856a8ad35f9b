"""Zips: which members are images, and which limits a zip breaks.

Zips are read in place; nothing is ever extracted, so zip-slip names are just labels:
- Skipped and counted in ``skipped``: directories, ``__MACOSX/``, hidden files (a path component
  starting with "."), caption/metadata side files by name (``.txt``, ``.caption``, ``.json``,
  ...: not counted against MAX_IMAGES_PER_JOB), and members whose content is not an image
  unless their name says it should be one (``x.jpg`` holding text is a per-image error).
- Per-image errors: symlink members, encrypted members, compression other than stored/deflate,
  a member over MAX_IMAGE_BYTES, a zip inside the zip, a damaged member.
- Job errors, checked from the central directory before anything is decompressed: more image
  candidates than MAX_IMAGES_PER_JOB, more than MAX_ZIP_UNCOMPRESSED_BYTES in total, or a member
  whose compression ratio exceeds MAX_ZIP_RATIO (members under ``RATIO_FLOOR`` = 64 KiB
  uncompressed are exempt: tiny files compress wildly without being bombs). While reading, a
  member never yields more than its declared size (zipfile stops there and checks the CRC), so
  a lying header is a per-image error. An unreadable zip fails the job when it is ``data_url``.
- Members come out sorted by path. The total across all sources is capped by MAX_IMAGES_PER_JOB.
"""
from __future__ import annotations

import re
import stat
import zipfile
import zlib

from config import ENV, Config
from errors import ImageError
from text import human_size, short

from .sniff import HEAD_BYTES, ZIP, _not_an_image, _reason, sniff

RATIO_FLOOR = 64 * 1024  # members smaller than this (uncompressed) skip the ratio check
_SIDE_FILE = re.compile(r"\.(txt|caption|tags|json|jsonl|csv|tsv|md|xml|ya?ml|toml|npz|npy)$",
                        re.IGNORECASE)
_IMAGE_NAME = re.compile(r"\.(jpe?g|jfif|png|gif|webp|bmp|tiff?|avif)$", re.IGNORECASE)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, ValueError,
               EOFError, RuntimeError, NotImplementedError)


# --- zips ------------------------------------------------------------------------------------

def _junk_name(name: str) -> bool:
    """macOS resource forks, hidden files and caption/metadata side files (``a.txt`` beside
    ``a.jpg`` in a training set): skipped by name, not errors, not counted against
    MAX_IMAGES_PER_JOB ('..' is not hidden)."""
    parts = [p for p in re.split(r"[/\\]", name) if p]
    return (not parts or parts[0] == "__MACOSX" or bool(_SIDE_FILE.search(parts[-1]))
            or any(p.startswith(".") and p not in (".", "..") for p in parts))


def _zip_limit_problem(files: list[zipfile.ZipInfo], candidates: int, cfg: Config) -> str | None:
    """Why this zip is over a job limit, from its central directory alone; None if it is not."""
    if candidates > cfg.max_images_per_job:
        return (f"the zip has {candidates} files; the limit is {cfg.max_images_per_job} "
                f"({ENV['max_images_per_job']}); split it into several jobs")
    total = sum(f.file_size for f in files)
    if total > cfg.max_zip_uncompressed_bytes:
        return (f"the zip's files total {human_size(total)} uncompressed; the limit is "
                f"{human_size(cfg.max_zip_uncompressed_bytes)} "
                f"({ENV['max_zip_uncompressed_bytes']}); split it into several jobs")
    for f in files:
        if f.file_size >= RATIO_FLOOR and f.file_size > cfg.max_zip_ratio * f.compress_size:
            ratio = f.file_size / max(f.compress_size, 1)
            return (f"zip member {short(f.filename, 80)!r} expands {ratio:.0f}x "
                    f"({human_size(f.compress_size)} to {human_size(f.file_size)}); the limit is "
                    f"{cfg.max_zip_ratio:g}x ({ENV['max_zip_ratio']}): this looks like a zip "
                    "bomb; zip the images with ordinary compression")
    return None


def _member_problem(info: zipfile.ZipInfo, cfg: Config) -> str | None:
    """Why a member cannot be an image, from its header alone; None if it may be one."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link in the zip: links are not followed; put the image itself in the zip"
    if info.flag_bits & 0x1:
        return "encrypted (password-protected) zip member; zip the images without a password"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return (f"zip member uses compression method {info.compress_type}; only stored and "
                "deflate (the usual zip compression) are read")
    if info.file_size > cfg.max_image_bytes:
        return (f"the image is {human_size(info.file_size)}; the limit is "
                f"{human_size(cfg.max_image_bytes)} ({ENV['max_image_bytes']})")
    return None


def _member_kind(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cfg: Config) -> str | None:
    """The member's image format; None for a non-image to skip; ImageError for a bad member."""
    problem = _member_problem(info, cfg)
    if problem:
        raise ImageError(problem)
    try:
        with zf.open(info) as member:
            head = member.read(HEAD_BYTES)
    except _ZIP_ERRORS as exc:
        raise ImageError(f"damaged zip member ({_reason(exc)}); create the zip again") from None
    kind = sniff(head)
    if kind == ZIP:
        raise ImageError("a zip inside the zip is not opened; zip the images themselves")
    if kind is None and _IMAGE_NAME.search(info.filename):
        raise ImageError(_not_an_image(head, info.file_size))
    return kind
