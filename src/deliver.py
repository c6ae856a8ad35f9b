"""Captions as files: the naming rule, the caption zip, and how the zip reaches the user.

Used by the job (``jobs.Worker``) for ``output_format: "zip"`` and by ``caption_folder.py``, so
a folder captioned locally and the same images zipped through the API get the same file names.

Naming (``CaptionNames``):
- An image's caption is ``<stem>.txt`` in the image's folder: ``shots/cat.jpg`` ->
  ``shots/cat.txt``, the layout kohya-ss and most dataset tools read.
- Collisions, compared ignoring case so the files also extract on Windows and macOS: the first
  image (in output order) keeps ``a.txt``; the next one takes its whole name, ``a.png.txt``;
  after that ``a-2.txt``, ``a-3.txt``, ... So ``a.jpg`` + ``a.png`` -> ``a.txt`` + ``a.png.txt``.
- Paths are made safe (``safe_parts``): ``/`` and ``\\`` both separate folders; empty, ``.`` and
  ``..`` parts and a leading drive (``C:``) are dropped; control characters become ``_``; a part
  is cut to 200 bytes. ``../../x.jpg`` -> ``x.txt``, ``/abs/x.jpg`` -> ``abs/x.txt``,
  ``back\\slash.jpg`` -> ``back/slash.txt``: nothing in the zip can point outside it.

Zip layout (``caption_files``):
- ``data_url``: a zip's members keep their folders; a single image is named after its URL's
  last path segment (``.../cat.jpg?x=1`` -> ``cat.txt``), ``data_url.txt`` when inline.
- ``data_urls``: images at the root, named the same way (``data_urls_3.txt`` when inline); each
  zip in a folder named after it (``photos.zip`` -> ``photos/``, inline -> ``data_urls_2/``;
  ``photos-2/`` when two zips share a name).
- A file holds the caption, then with ``num_captions > 1`` the alternatives, one per line, best
  first (kohya-ss trains on the first line, or on a random line with ``--enable_wildcard``).
  UTF-8, newline-terminated; a line break inside a caption (a prompt with one, with
  ``include_prompt``) becomes a space.
- Images that failed get no file; they are in ``errors`` as usual.

Delivery (``zip_fields``), beside the JSON ``captions`` which are always returned:
- all four bucket settings set: uploaded with runpod's ``rp_upload`` to ``BUCKET_NAME`` as
  ``<job id>/captions.zip`` -> ``{"captions_zip_url": presigned link, valid 7 days}``;
- no bucket: ``{"captions_zip": base64}`` up to ``MAX_INLINE_ZIP_BYTES``;
- a larger zip, or a failed upload: ``{"captions_zip_error": message}``. The job still
  COMPLETES: every caption is in ``captions`` (the zip holds nothing more), so failing the job
  would throw away finished GPU work for a packaging problem; the message sits beside the key
  the client looks for and says how to fix it.
The zip's bytes, its base64 and the presigned link are never logged.
"""
from __future__ import annotations

import base64
import io
import logging
import posixpath
import re
import time
import zipfile
from typing import Any, Iterable, Sequence
from urllib.parse import unquote, urlsplit

from config import BUCKET_FIELDS, ENV, Config
from text import human_size, short

log = logging.getLogger("blip.deliver")

ZIP_NAME = "captions.zip"
MAX_PART_BYTES = 200  # longest folder or file name written (file systems stop at 255)
_SEPARATORS = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"[A-Za-z]:")
_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")  # str.splitlines

Path = tuple[str, ...]


# --- naming ----------------------------------------------------------------------------------

def safe_parts(name: str) -> list[str]:
    """The folders and file name of ``name`` with nothing that could leave the folder."""
    parts = [p for p in _SEPARATORS.split(name) if p not in ("", ".", "..")]
    if parts and _DRIVE.fullmatch(parts[0]):
        parts = parts[1:]
    return [_clip(_CONTROL.sub("_", p)) for p in parts]


def _clip(part: str, limit: int = MAX_PART_BYTES) -> str:
    return part.encode()[:limit].decode("utf-8", "ignore")


def _with_suffix(base: str, suffix: str) -> str:
    """``base + suffix``, ``base`` shortened so the whole stays within MAX_PART_BYTES."""
    return _clip(base, MAX_PART_BYTES - len(suffix.encode())) + suffix


def _key(path: Path) -> Path:
    return tuple(p.casefold() for p in path)


class CaptionNames:
    """Hands out caption file paths (tuples of parts), unique ignoring case, in the order asked."""

    def __init__(self) -> None:
        self._files: set[Path] = set()
        self._dirs: set[Path] = set()

    def _free(self, path: Path) -> bool:
        key = _key(path)
        return (key not in self._files and key not in self._dirs
                and not any(key[:k] in self._files for k in range(1, len(key))))

    def folder(self, wanted: str) -> str:
        """A top-level folder for one source: ``wanted``, else ``wanted-2``, ``wanted-3``, ..."""
        name, k = _clip(wanted), 1
        while not self._free((name,)):
            k += 1
            name = _with_suffix(wanted, f"-{k}")
        self._dirs.add(_key((name,)))
        return name

    def caption_file(self, folder: Path, image_name: str) -> Path:
        """``folder/<stem>.txt`` for the image ``image_name``, or the next free variant."""
        stem = posixpath.splitext(image_name)[0] or image_name
        candidates = [_with_suffix(stem, ".txt"), _with_suffix(image_name, ".txt")]
        k = 1
        while True:
            for name in candidates:
                path = folder + (name,)
                if self._free(path):
                    key = _key(path)
                    self._files.add(key)
                    self._dirs.update(key[:j] for j in range(1, len(key)))
                    return path
            k += 1
            candidates = [_with_suffix(stem, f"-{k}.txt")]


def caption_text(captions: Sequence[str]) -> str:
    """The file's content: one caption per line, best first, newline-terminated."""
    return "".join(_LINE_BREAKS.sub(" ", c).strip() + "\n" for c in captions)


# --- the zip's layout ------------------------------------------------------------------------

def _field_name(request: Any, i: int) -> str:
    return "data_url" if request.single else f"data_urls_{i}"


def _url_name(request: Any, i: int) -> str:
    """The last path segment of source ``i``'s URL, made safe; the field name when inline."""
    source = request.sources[i]
    if source[:5].lower() != "data:":
        parts = safe_parts(unquote(posixpath.basename(urlsplit(source).path)))
        if parts:
            return parts[-1]
    return _field_name(request, i)


def caption_files(request: Any, rows: Iterable[tuple[tuple[int, int], dict]],
                  members: dict[tuple[int, int], str]) -> list[tuple[str, str]]:
    """``(path in the zip, file content)`` for each captioned row, in output order.
    ``members`` gives each row's raw zip member name ("" for a whole source), as read from the
    zip: never parsed back out of the display label."""
    rows = sorted(rows, key=lambda r: r[0])
    located = [(order[0], members.get(order) or None, row) for order, row in rows]
    names = CaptionNames()
    folders: dict[int, Path] = {}
    for i, member, _ in located:  # zip folders first, in source order: files then avoid them
        if member is not None and i not in folders:
            wanted = posixpath.splitext(_url_name(request, i))[0] or _field_name(request, i)
            folders[i] = () if request.single else (names.folder(wanted),)
    files = []
    for i, member, row in located:
        if member is None:
            folder, image_name = (), _url_name(request, i)
        else:
            parts = safe_parts(member) or [_field_name(request, i)]
            folder, image_name = folders[i] + tuple(parts[:-1]), parts[-1]
        path = names.caption_file(folder, image_name)
        files.append(("/".join(path), caption_text([row["caption"], *row.get("alternatives", [])])))
    return files


def build_zip(files: Iterable[tuple[str, str]]) -> bytes:
    """A deflated zip of ``(path, text)`` files, UTF-8, readable by everyone (0644)."""
    buf = io.BytesIO()
    stamp = time.localtime()[:6]
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, text in files:
            info = zipfile.ZipInfo(path, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, text.encode("utf-8"))
    return buf.getvalue()


# --- delivery --------------------------------------------------------------------------------

def bucket_configured(cfg: Config) -> bool:
    """True when caption zips are uploaded (Config.from_env checks all four or none are set)."""
    return all(getattr(cfg, f) for f in BUCKET_FIELDS)


def _bucket_settings() -> str:
    return ", ".join(ENV[f] for f in BUCKET_FIELDS)


def upload(data: bytes, job_id: str, cfg: Config) -> str:
    """Upload the zip as ``<job id>/captions.zip``; return the presigned link. Raises on failure."""
    from runpod.serverless.utils import rp_upload  # boto3 is imported only when uploading

    url = rp_upload.upload_in_memory_object(
        ZIP_NAME, data, bucket_name=cfg.bucket_name, prefix=job_id,
        bucket_creds={"endpointUrl": cfg.bucket_endpoint_url,
                      "accessId": cfg.bucket_access_key_id,
                      "accessSecret": cfg.bucket_secret_access_key})
    if not str(url).lower().startswith(("http://", "https://")):  # rp_upload's disk fallback
        raise RuntimeError("boto3 is not installed, so runpod saved the zip on the worker's disk")
    return url


def zip_fields(request: Any, rows: Sequence[tuple[tuple[int, int], dict]],
               members: dict[tuple[int, int], str], job_id: str, cfg: Config) -> dict[str, str]:
    """``captions_zip_url``, ``captions_zip`` or ``captions_zip_error`` (see module docstring)."""
    files = caption_files(request, rows, members)
    data = build_zip(files)
    size = human_size(len(data))
    if bucket_configured(cfg):
        key = f"{job_id}/{ZIP_NAME}"
        try:
            url = upload(data, job_id, cfg)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; never fatal
            reason = f"{type(exc).__name__}: {short(str(exc), 200)}"
            log.warning("job %s: caption zip upload to bucket %s failed: %s", job_id,
                        cfg.bucket_name, reason)
            return {"captions_zip_error": (
                f"could not upload the caption zip to bucket {cfg.bucket_name!r} at "
                f"BUCKET_ENDPOINT_URL ({reason}); check {_bucket_settings()}. Every caption "
                "is in `captions`.")}
        log.info("job %s: caption zip (%d files, %s) uploaded to %s/%s", job_id, len(files),
                 size, cfg.bucket_name, key)
        return {"captions_zip_url": url}
    if len(data) > cfg.max_inline_zip_bytes:
        log.info("job %s: caption zip (%d files, %s) over the inline limit", job_id,
                 len(files), size)
        return {"captions_zip_error": (
            f"the caption zip is {size}; the most returned inline is "
            f"{human_size(cfg.max_inline_zip_bytes)} ({ENV['max_inline_zip_bytes']}). Set "
            f"{_bucket_settings()} on the endpoint to receive it as `captions_zip_url`, or "
            "split the job. Every caption is in `captions`.")}
    log.info("job %s: caption zip (%d files, %s) returned inline", job_id, len(files), size)
    return {"captions_zip": base64.b64encode(data).decode("ascii")}
