"""One job's inputs: its sources fetched into a private directory and handed out image by image.

``JobInputs(sources, single, cfg)`` is a context manager that owns one private temporary
directory and one bounded download pool per job. Iterating it yields ``ImageSource`` (one image
ready to decode) and ``ImageFailure`` (one image that failed) AS THEY BECOME READY, so the caller
can decode and caption while downloads continue; ``order`` gives the final output order.

Sources are http(s) URLs (``download``) or base64 data: URIs (``sniff._save_data_uri``);
anything else is refused naming the field.

Labels (``image_path``): the URL for an image URL; ``data_url`` / ``data_urls[i]`` for inline
data; a zip member's path, prefixed by the zip's label (``f"{label}/{member}"``) when the job
has several sources. Unprintable characters in labels and messages (a newline, a lone surrogate)
are written as escapes (``printable``), so every answer is readable and encodes as UTF-8.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, Callable, Iterator

from config import ENV, Config
from errors import ImageError, JobError
from schema import SOURCE_FORMS, source_problem
from text import printable, short

from .download import _Downloader
from .sniff import ZIP, _reason, _save_data_uri
from .zips import _ZIP_ERRORS, _junk_name, _member_kind, _zip_limit_problem


@dataclass(frozen=True)
class ImageSource:
    """One image ready to decode."""
    order: tuple[int, int]  # (source index, position within that source): final output order
    image_path: str  # the label shown to the user (unprintable characters escaped)
    open: Callable[[], BinaryIO]  # a new seekable binary stream each call; any thread
    member: str = ""  # the raw member name inside its zip; "" for a whole source
    discard: Callable[[], None] | None = None  # frees the stored file once it is decoded


@dataclass(frozen=True)
class ImageFailure:
    """One image that failed; ``error`` names the problem and the fix where there is one."""
    order: tuple[int, int]
    image_path: str
    error: str
    member: str = ""


@dataclass(frozen=True)
class _Fetched:
    path: str
    kind: str  # ZIP or a PIL format name


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.remove(path)


# --- the job's inputs ------------------------------------------------------------------------

# A job fetches at most this many sources per download thread ahead of the images it has taken.
AHEAD_PER_DOWNLOAD = 2


class JobInputs:
    """One job's sources, fetched concurrently into a private temporary directory.

    Use as ``with JobInputs(sources, single, cfg) as inputs: for item in inputs: ...``.
    Iteration raises ``JobError`` for job-fatal problems (possibly mid-way); leaving the block
    cancels downloads, closes zips and deletes the directory, also on exceptions.
    """

    def __init__(self, sources: list[str], single: bool, cfg: Config):
        self._sources = list(sources)
        self._single = single
        self._cfg = cfg
        self._downloads = _Downloader(cfg)
        self._pool: ThreadPoolExecutor | None = None
        self._zips: list[zipfile.ZipFile] = []
        self._admitted = 0
        self._closed = False
        self._lock = threading.Lock()
        self.dir: str | None = None  # the job's private directory while the block runs
        self.skipped = 0  # zip members skipped (directories, __MACOSX, hidden, non-images)
        self.fetched_at: float | None = None  # time.monotonic() when the last source arrived

    def __enter__(self) -> "JobInputs":
        parent = self._cfg.work_dir or None
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="job-", dir=parent)
        workers = max(1, min(self._cfg.download_concurrency, len(self._sources)))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="download")
        self._ahead = AHEAD_PER_DOWNLOAD * workers
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel downloads, wait for their threads, close zips, delete the directory."""
        if self._closed:
            return
        self._closed = True
        self._downloads.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for zf in self._zips:
            zf.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def cancel(self) -> None:
        """Stop fetching now, from any thread (blocked downloads are cut; nothing waits):
        iteration ends; leaving the block still cleans up."""
        self._downloads.cancel()

    def __iter__(self) -> Iterator[ImageSource | ImageFailure]:
        if self._pool is None or self._closed:
            raise RuntimeError("iterate inside `with JobInputs(...) as inputs:`")
        # Sources are fetched at most ``_ahead`` ahead of the loop that takes them (the job's
        # loop blocks while the GPU has enough images queued), so a 1000-file job does not
        # download everything to disk while its first images are still being captioned.
        todo = iter(enumerate(self._sources))
        pending: dict[Future, int] = {}

        def top_up() -> None:
            while len(pending) < self._ahead:
                nxt = next(todo, None)
                if nxt is None:
                    return
                pending[self._pool.submit(self._fetch, *nxt)] = nxt[0]

        top_up()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):  # ready ones in input order
                if self._closed or self._downloads.cancelled.is_set():
                    return
                yield from self._items(pending.pop(future), future)
                top_up()

    # -- naming --

    def _is_data(self, i: int) -> bool:
        return self._sources[i][:5].lower() == "data:"

    def _field(self, i: int) -> str:
        return "data_url" if self._single else f"data_urls[{i}]"

    def _where(self, i: int) -> str:
        """The source, for a job error: its field, and its URL when it has one."""
        if self._is_data(i):
            return self._field(i)
        return f"{self._field(i)} ({short(printable(self._sources[i]), 100)})"

    def _label(self, i: int) -> str:
        return self._field(i) if self._is_data(i) else printable(self._sources[i])

    def _member_label(self, i: int, name: str) -> str:
        return f"{self._label(i)}/{printable(name)}" if len(self._sources) > 1 else printable(name)

    # -- fetching (download pool threads) --

    def _fetch(self, i: int, src: str) -> _Fetched:
        # Defence in depth: the schema (parse_request) checks every source once, and the worker
        # builds JobInputs only from a parsed request; checked again here because JobInputs
        # takes any list, and a source that is neither an http(s) URL nor a data: URI (a local
        # path, file:) must never reach the downloader, whoever the caller is.
        problem = source_problem(src)
        if problem:
            raise ImageError(f"{problem}; use {SOURCE_FORMS}")
        assert self.dir is not None
        path = os.path.join(self.dir, str(i))
        try:
            if self._is_data(i):
                fetched = _Fetched(path, _save_data_uri(src, path, self._cfg))
            else:
                fetched = _Fetched(path, self._downloads.fetch(src, path))
            with self._lock:
                self.fetched_at = time.monotonic()
            return fetched
        except OSError as exc:
            _remove(path)
            raise ImageError(f"could not store the file ({_reason(exc)})") from None
        except BaseException:
            _remove(path)
            raise

    # -- yielding (the iterating thread) --

    def _items(self, i: int, future: Future) -> Iterator[ImageSource | ImageFailure]:
        try:
            fetched: _Fetched = future.result()
        except ImageError as err:
            yield self._source_failure(i, err.message)
            return
        if fetched.kind == ZIP:
            yield from self._zip_items(i, fetched.path)
            return
        self._admit(1, i)
        yield ImageSource((i, 0), self._label(i), partial(open, fetched.path, "rb"),
                          discard=partial(_remove, fetched.path))

    def _source_failure(self, i: int, message: str) -> ImageFailure:
        """A whole source failed: the job fails when it was the only one (``data_url``)."""
        message = printable(message)  # it may quote the URL (a refusal, a requests error)
        if self._single:
            raise JobError(f"{self._where(i)}: {message}")
        self._admit(1, i)
        return ImageFailure((i, 0), self._label(i), message)

    def _admit(self, count: int, i: int) -> None:
        self._admitted += count
        limit = self._cfg.max_images_per_job
        if self._admitted > limit:
            raise JobError(f"the job has more than {limit} images (counting every file in its "
                           f"zips, at {self._where(i)}); the limit is {limit} "
                           f"({ENV['max_images_per_job']}); split it into several jobs")

    def _zip_items(self, i: int, path: str) -> Iterator[ImageSource | ImageFailure]:
        try:
            zf = zipfile.ZipFile(path)
        except _ZIP_ERRORS as exc:
            yield self._source_failure(i, f"unreadable zip archive ({_reason(exc)}); the file "
                                          "may be truncated or damaged: create it again")
            return
        self._zips.append(zf)
        files = [info for info in zf.infolist() if not info.is_dir()]
        candidates = sorted((f for f in files if not _junk_name(f.filename)),
                            key=lambda f: f.filename)
        self.skipped += len(zf.infolist()) - len(candidates)
        problem = _zip_limit_problem(files, len(candidates), self._cfg)
        if problem:
            raise JobError(f"{self._where(i)}: {problem}")
        self._admit(len(candidates), i)
        for position, info in enumerate(candidates):
            item = self._member_item(zf, info, (i, position))
            if item is None:
                self.skipped += 1
            else:
                yield item

    def _member_item(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                     order: tuple[int, int]) -> ImageSource | ImageFailure | None:
        label = self._member_label(order[0], info.filename)
        try:
            kind = _member_kind(zf, info, self._cfg)
        except ImageError as err:
            return ImageFailure(order, label, err.message, info.filename)
        if kind is None:
            return None
        return ImageSource(order, label, partial(zf.open, info), info.filename)
