"""Caption a whole dataset on a RunPod endpoint: fan-out, retries, resume, dataset outputs.

    RUNPOD_API_KEY=... python src/caption_dataset.py ~/datasets/dogs --endpoint ID \\
        --out ~/datasets/dogs/metadata.jsonl --format hf
    RUNPOD_API_KEY=... python src/caption_dataset.py urls.txt --endpoint ID --out captions.jsonl

A client apart from the service: it splits the work into /run jobs, keeps at most
``--max-in-flight`` of them running on the endpoint (whose autoscaled workers do the work),
polls them, resubmits what was lost and writes each image's caption or error exactly once.
It runs on the official runpod SDK (``runpod.Endpoint``; ``RUNPOD_ENDPOINT_BASE_URL`` moves the
base URL, which is how the tests point it at a local simulator). The key comes from
``RUNPOD_API_KEY`` only: never a flag, never logged. It imports only torch-free worker modules
(schema, config, errors, deliver, inputs' decoding, caption_folder's file walk); pre-resizing
imports ``preprocess`` (and so torch) lazily, for its ``resize``. It never loads a model.

Sources (several may be given):
- a local folder: images chosen as ``caption_folder.py`` chooses them, sent inline as base64
  ``data:`` URIs. ``source`` = the file's path relative to its folder (prefixed by the folder as
  given when several folders are given);
- a URL list: ``.txt`` (one URL per line; blank lines and ``#`` comments skipped), ``.csv``
  with a ``url`` column, ``.jsonl`` with a ``url`` key. A line that is not an http(s) URL or
  data: URI is recorded as that image's error at once (sent, it would fail its whole job);
  a URL listed twice is captioned once;
- ``s3://bucket/prefix``: listed with boto3 (``BUCKET_ENDPOINT_URL`` / ``BUCKET_ACCESS_KEY_ID``
  / ``BUCKET_SECRET_ACCESS_KEY`` when set, else the standard AWS environment), image keys only,
  each sent as a presigned GET URL made when its job is submitted and valid 24 h (RunPod's
  default job TTL), so it outlives the job however long the run. ``source`` is
  ``s3://bucket/key``; the presigned URL is never written;
- an http(s) URL of one zip: one job with ``data_url``; each member becomes a line
  (``source`` = the URL, ``image_path`` = the member path).

Jobs (decisions):
- ``--images-per-job`` (default 256) caps every job: one full GPU batch on an 80 GB GPU, so the
  per-job overhead amortises while a resubmitted job re-runs at most 256 images, and a
  10,000-image dataset spreads over 40 jobs for the autoscaler. Inline jobs are also packed so
  the /run body, measured as the SDK sends it (``json.dumps`` of ``{"input": ...}``, default
  separators), stays at most ``--max-body-bytes`` (RunPod's 10,000,000). A file that does not
  fit alone gets a per-image error naming the limit and what to do.
- Pre-resize (default on; ``--no-preresize``): the worker's own decoding (``inputs.
  decode_image``: EXIF orientation, RGB, JPEG draft) and resize (``preprocess.resize``, bicubic
  to ``--image-size``, 364 = the endpoint model's input) then lossless WebP, so the worker sees
  exactly the pixels it would have made from the original and the captions are the same. The
  smaller of the two encodings is sent (a small JPEG beats any lossless 364x364 image), and
  files up to ``RAW_FLOOR`` (64 KiB) are sent as they are without decoding. A file the client
  cannot decode is sent as it is, so the worker gives its own verdict.
- Requests: the request flags are ``caption_folder.py``'s (``schema.FIELDS``), checked by the
  worker's own ``schema.parse_request`` before anything is sent; only the flags given are sent.
- Concurrency: ``--max-in-flight`` (default 32) jobs at once, each submitted and polled (every
  ``--poll-interval`` s) by its own thread with its own SDK session. A 429 from /run or /status
  waits ``Retry-After`` (else an exponential back-off) and carries on; network errors and 5xx
  answers are retried the same way.
- Outcomes: COMPLETED records the captions and per-image errors. FAILED with ``invalid
  input: ...`` is recorded for the job's images without a retry; so is the worker's ``no image
  could be captioned`` (every image failed on the worker, after its own download retries: each
  image gets its own reason from the message). Any other FAILED, TIMED_OUT, CANCELLED, an
  answer with ``refresh_worker``, or a lost job (status not found, or no change for
  ``--job-timeout`` = 600 s) is cancelled (best effort) and its images resubmitted, up to
  ``--retries`` (3) times, then recorded with the last reason. The timeout counts from the last
  change the client saw: the job's status or progress text, and, while a job is still queued,
  any change of any job of the run (a long queue that moves is not lost).
- Ctrl-C (or SIGTERM): stop submitting, cancel the jobs in flight through the API, write what
  finished, print the summary, exit 130 (143). A second Ctrl-C stops at once.

Output (``--out``, ``--format``), appended and flushed (and fsynced) after each job:
- ``jsonl``: ``{"source", "image_path", "caption", "alternatives"?}`` or ``{"source",
  "image_path", "error"}``;
- ``csv``: ``source,image_path,caption,error`` (the best caption only);
- ``hf``: ``FOLDER/metadata.jsonl`` with ``file_name`` (relative to the folder of ``--out``) and
  ``text``, successes only, as ``datasets``' imagefolder reads it; failures go to
  ``<stem>.errors.jsonl`` beside it (imagefolder ignores it). Sources must be folders inside
  the folder of ``--out``;
- ``txt``: ``<stem>.txt`` beside each image, named as ``caption_folder.py`` names them (a file is
  written whole), and ``--out`` holds the run's record as JSON lines (with ``caption_file``).
  Sources must be folders.

Resume (every format): on start the existing output is read (for ``txt``, the record), a torn
last line (a kill mid-write) is dropped, and images already there are skipped; with
``--retry-failed`` those recorded with an error are retried: the file is first rewritten
atomically without their lines, so each image still ends as exactly one line. A zip source is
skipped when it has lines and they are not the file's last block (only the last block can have
been cut); otherwise it runs again and only members not yet written are added. Jobs in flight at
a kill may run twice on the endpoint; the output never holds an image twice.

Summary on stdout (captioned, failed, skipped, images/s, bytes sent and saved by pre-resizing,
GPU seconds = the sum of the workers' ``caption_s``); ``--stats FILE`` also writes it as JSON.
Exit codes as ``caption_folder.py``: 0; 1 when any image is recorded with an error (now or in an
earlier run and not retried); 2 for bad flags, sources, settings, key or endpoint; 130 after
Ctrl-C.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import mimetypes
import os
import posixpath
import random
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import schema
from caption_folder import (FLAG_FIELDS, IMAGE_EXTENSIONS, add_request_flags, find_images, flag,
                            parse_options, write_caption)
from config import BUCKET_FIELDS, ENV, Config, ConfigError
from deliver import CaptionNames, caption_text
from errors import ImageError, JobError
from inputs import ImageSource, decode_image
from text import human_size, printable, short

MAX_BODY_BYTES = 10_000_000  # RunPod's /run body limit
IMAGES_PER_JOB = 256
MAX_IN_FLIGHT = 32
RETRIES = 3
JOB_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 1.0
IMAGE_SIZE = 364  # caption_coco_opt2.7b's (and tiny-random's) input size
RAW_FLOOR = 64 * 1024  # files this small are sent as they are: no lossless 364 px image is smaller
URL_EXPIRY_S = 24 * 3600
BACKOFF_MAX_S = 30.0
FORMATS = ("jsonl", "csv", "hf", "txt")
LIST_EXTENSIONS = (".txt", ".csv", ".jsonl")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
LIVE_STATES = ("IN_QUEUE", "IN_PROGRESS")
NO_RETRY = ("invalid input:",)  # the worker's verdict on the request itself
ALL_FAILED = ("no image could be captioned", "no images found to caption")
CSV_FIELDS = ("source", "image_path", "caption", "error")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_SIGNED = re.compile(r"\?[^\s'\")]*X-Amz-[^\s'\")]*")  # presigned query strings in messages


class UsageError(Exception):
    """Bad flags, sources, settings or output: exit 2 with this message."""


class Fatal(Exception):
    """The endpoint refuses the run as a whole (bad key, unknown endpoint): stop, exit 2."""


# --- the work --------------------------------------------------------------------------------

@dataclass
class Item:
    """One image of the dataset (or one zip source)."""
    source: str  # what the output calls it
    image_path: str
    kind: str  # "file" | "url" | "s3" | "zip" | "bad" (a list line that is not a source)
    ref: str  # the file's path, the URL, the object key, or the problem ("bad")
    bucket: str = ""
    caption_file: str = ""  # txt format: where its caption goes
    file_name: str = ""  # hf format: relative to the folder of --out

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.image_path


@dataclass
class Prepared:
    """What goes into ``data_urls`` for one item, and what it cost."""
    entry: str  # the URL or data: URI
    entry_bytes: int  # len(json.dumps(entry)): its share of the body
    raw_bytes: int = 0  # the file's size (inline items)
    data_bytes: int = 0  # the bytes actually encoded (pre-resized or raw)
    preresized: bool = False
    error: str | None = None  # cannot be sent at all


@dataclass
class Row:
    """One output line: an image's caption or its error."""
    item: Item
    source: str
    image_path: str
    caption: str | None = None
    alternatives: list[str] | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.image_path


# --- sources ---------------------------------------------------------------------------------

def source_kind(text: str) -> str:
    lower = text.lower()
    if lower.startswith("s3://"):
        return "s3"
    if lower.startswith(("http://", "https://")):
        return "zip"
    if os.path.isdir(text):
        return "folder"
    if os.path.isfile(text) and os.path.splitext(lower)[1] in LIST_EXTENSIONS:
        return "list"
    if os.path.isfile(text):
        raise UsageError(f"{text}: a URL list must be .txt (one URL per line), .csv (a `url` "
                         "column) or .jsonl (a `url` key)")
    raise UsageError(f"{text}: not a folder, a URL list (.txt, .csv, .jsonl), an s3://bucket/"
                     "prefix or an http(s) URL of a zip")


def folder_items(root: str, prefix: str, fmt: str, out_dir: str) -> list[Item]:
    names = CaptionNames()
    items = []
    for parts in find_images(root):
        rel = "/".join(parts)
        path = os.path.join(root, *parts)
        name = f"{prefix}/{rel}" if prefix else rel
        item = Item(name, name, "file", path)
        if fmt == "txt":
            item.caption_file = os.path.join(root, *names.caption_file(parts[:-1], parts[-1]))
        if fmt == "hf":
            item.file_name = os.path.relpath(os.path.abspath(path), out_dir).replace(os.sep, "/")
        items.append(item)
    return items


def read_url_list(path: str) -> list[str]:
    """The URLs of a .txt / .csv / .jsonl list, in order."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="") as fh:
        if ext == ".txt":
            return [s for line in fh if (s := line.strip()) and not s.startswith("#")]
        if ext == ".csv":
            reader = csv.DictReader(fh)
            if "url" not in (reader.fieldnames or []):
                raise UsageError(f"{path}: no `url` column (columns: "
                                 f"{', '.join(reader.fieldnames or []) or 'none'})")
            return [s for row in reader if (s := (row.get("url") or "").strip())]
        urls = []
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{n}: not a JSON object") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("url"), str):
                raise UsageError(f"{path}:{n}: each line needs a \"url\" string")
            urls.append(rec["url"].strip())
        return urls


def url_items(urls: Iterable[str]) -> list[Item]:
    items = []
    for url in urls:
        problem = schema.source_problem(url)
        if problem:
            items.append(Item(url, url, "bad", f"{problem}; use {schema.SOURCE_FORMS}"))
        else:
            items.append(Item(url, url, "url", url))
    return items


def s3_client():
    """boto3's S3 client: the worker's BUCKET_* settings when set, else the AWS environment."""
    import boto3
    from botocore.config import Config as BotoConfig
    kwargs: dict[str, Any] = {"config": BotoConfig(signature_version="s3v4")}
    env = os.environ
    if env.get("BUCKET_ENDPOINT_URL"):
        kwargs["endpoint_url"] = env["BUCKET_ENDPOINT_URL"]
    if env.get("BUCKET_ACCESS_KEY_ID") and env.get("BUCKET_SECRET_ACCESS_KEY"):
        kwargs["aws_access_key_id"] = env["BUCKET_ACCESS_KEY_ID"]
        kwargs["aws_secret_access_key"] = env["BUCKET_SECRET_ACCESS_KEY"]
    if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        kwargs["region_name"] = "us-east-1"
    return boto3.client("s3", **kwargs)


def s3_items(uri: str, client) -> list[Item]:
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise UsageError(f"{uri}: give s3://bucket or s3://bucket/prefix")
    items = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                parts = key.split("/")
                if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                    continue
                if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS:
                    name = f"s3://{bucket}/{key}"
                    items.append(Item(name, name, "s3", key, bucket=bucket))
    except Exception as exc:  # noqa: BLE001 - botocore raises many types
        raise UsageError(f"{uri}: could not list the bucket ({type(exc).__name__}: "
                         f"{short(str(exc), 200)}); check BUCKET_ENDPOINT_URL / the AWS "
                         "settings and credentials") from None
    return items


def plan_items(sources: Sequence[str], fmt: str, out: str, s3=None) -> tuple[list[Item], int]:
    """Every item of the sources (duplicates dropped) and how many duplicates there were."""
    kinds = [source_kind(s) for s in sources]
    out_dir = os.path.dirname(os.path.abspath(out))
    if fmt in ("hf", "txt"):
        for s, kind in zip(sources, kinds):
            if kind != "folder":
                raise UsageError(f"--format {fmt} writes beside local images: {s} is not a "
                                 "folder; use --format jsonl or csv for URL lists, s3:// and "
                                 "zip sources")
            if fmt == "hf" and os.path.relpath(os.path.abspath(s), out_dir).startswith(".."):
                raise UsageError(f"--format hf: {s} is not inside {out_dir or '.'}, the folder "
                                 "of --out (metadata.jsonl names images relative to its own "
                                 "folder); put --out at FOLDER/metadata.jsonl")
    folders = sum(k == "folder" for k in kinds)
    items: list[Item] = []
    for s, kind in zip(sources, kinds):
        if kind == "folder":
            prefix = os.path.normpath(s).replace(os.sep, "/") if folders > 1 else ""
            items += folder_items(s, prefix, fmt, out_dir)
        elif kind == "list":
            items += url_items(read_url_list(s))
        elif kind == "s3":
            items += s3_items(s, s3 if s3 is not None else s3_client())
        else:
            items.append(Item(s, s, "zip", s))
    unique: dict[tuple[str, str], Item] = {}
    for item in items:
        unique.setdefault(item.key, item)
    return list(unique.values()), len(items) - len(unique)


# --- preparing inline files ------------------------------------------------------------------

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


# --- jobs ------------------------------------------------------------------------------------

@dataclass
class Job:
    items: list[Item]
    input: dict
    body_bytes: int
    labels: dict[str, Item]  # the worker's image_path of each item
    raw_bytes: int = 0
    data_bytes: int = 0
    preresized: int = 0

    @property
    def zip(self) -> bool:
        return len(self.items) == 1 and self.items[0].kind == "zip"


@dataclass
class Result:
    """What a job thread learned: a final state, a lost job, or nothing (stopped)."""
    kind: str  # "state" | "lost" | "rejected" | "stopped"
    state: dict = field(default_factory=dict)
    reason: str = ""


def classify(state: dict) -> tuple[str, str]:
    """The outcome table: ("ok" | "final" | "all_failed" | "retry", reason)."""
    status = state.get("status")
    output = state.get("output")
    if status == "COMPLETED":
        if isinstance(output, dict) and output.get("refresh_worker"):
            return "retry", f"the worker asked to be replaced: {error_text(output)}"
        if isinstance(output, dict) and "error" in output and "captions" not in output:
            status, state = "FAILED", {"error": output["error"]}
        elif not isinstance(output, dict) or not isinstance(output.get("captions"), list):
            return "retry", "the job COMPLETED without captions in its output"
        else:
            return "ok", ""
    if status == "FAILED":
        reason = error_text(state)
        if reason.startswith(NO_RETRY):
            return "final", reason
        if reason.startswith(ALL_FAILED):
            return "all_failed", reason
        return "retry", f"the job FAILED: {reason}"
    if status in ("TIMED_OUT", "CANCELLED"):
        return "retry", f"the job was {status} on the endpoint"
    return "retry", f"the endpoint answered status {short(str(status), 40)}"


def error_text(state: dict) -> str:
    err = state.get("error")
    if isinstance(err, str):
        try:  # RunPod wraps a handler's exception as JSON text
            decoded = json.loads(err)
            if isinstance(decoded, dict) and "error_message" in decoded:
                err = str(decoded["error_message"])
        except ValueError:
            pass
        return err
    return "no error message" if err is None else short(json.dumps(err), 300)


def split_reasons(message: str, labels: Sequence[str]) -> dict[str, str]:
    """Each image's own reason in ``no image could be captioned (N failed): a: why; b: why``."""
    head, sep, body = message.partition("): ")
    if not sep:
        return {}
    found = []
    for label in labels:
        marker = f"{short(label)}: "
        start = 0
        while (pos := body.find(marker, start)) >= 0:
            if pos == 0 or body[pos - 2:pos] == "; ":
                found.append((pos, label, len(marker)))
                break
            start = pos + 1
    found.sort()
    reasons = {}
    for n, (pos, label, width) in enumerate(found):
        end = found[n + 1][0] - 2 if n + 1 < len(found) else len(body)
        text = body[pos + width:end]
        reasons[label] = re.sub(r"; \.\.\. and \d+ more$", "", text)
    return reasons


def rows_from_output(job: Job, output: dict, done: set) -> tuple[list[Row], list[Item]]:
    """Rows for a COMPLETED job (zip members not in ``done``) and the items it did not mention."""
    entries = [(e, None) for e in output.get("captions", []) if isinstance(e, dict)]
    entries += [(e, str(e.get("error"))) for e in output.get("errors", []) if isinstance(e, dict)]
    mentioned: dict[int, list[Row]] = {}
    for entry, error in entries:
        label = str(entry.get("image_path", ""))
        item = job.labels.get(label)
        if item is not None:
            path = item.image_path
        elif job.zip:
            item, path = job.items[0], label
        else:  # a zip inside a URL list: "<url>/<member>"
            item = next((it for lab, it in job.labels.items() if label.startswith(lab + "/")),
                        None)
            if item is None:
                continue
            path = label[len(printable(item.ref)) + 1:]
        row = Row(item, item.source, path, error=error)
        if error is None:
            row.caption = str(entry.get("caption", ""))
            if isinstance(entry.get("alternatives"), list):
                row.alternatives = [str(a) for a in entry["alternatives"]]
        if row.key in done:
            continue
        mentioned.setdefault(id(item), []).append(row)
    rows = [r for item in job.items for r in mentioned.get(id(item), [])]
    missing = [] if job.zip else [it for it in job.items if id(it) not in mentioned]
    if job.zip and not entries:
        missing = list(job.items)
    return rows, missing


def retry_after(response) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), None when absent."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)


# --- talking to the endpoint -----------------------------------------------------------------

class Fleet:
    """Submits and polls jobs with the runpod SDK, one session per thread."""

    def __init__(self, endpoint_id: str, api_key: str, base_url: str, poll_s: float,
                 job_timeout: float, stop: threading.Event):
        self.endpoint_id = endpoint_id
        self._key = api_key
        self.base_url = base_url
        self.poll_s = poll_s
        self.job_timeout = job_timeout
        self.stop = stop
        self.moved = time.monotonic()  # the last change seen on any job of the run
        self.throttled = 0  # 429 answers seen (after the SDK's own retries)
        self.network_errors = 0
        self._local = threading.local()

    def endpoint(self):
        ep = getattr(self._local, "endpoint", None)
        if ep is None:
            import runpod
            ep = runpod.Endpoint(self.endpoint_id, api_key=self._key)
            ep.rp_client.endpoint_url_base = self.base_url
            self._local.endpoint = ep
        return ep

    def run(self, job: Job) -> Result:
        """Submit the job and follow it to a final state (or lose it, or stop)."""
        submitted = self._submit(job)
        if not isinstance(submitted, str):
            return submitted
        return self._follow(submitted)

    def _submit(self, job: Job) -> Result | str:
        import requests
        ep = self.endpoint()
        first_try, attempt = time.monotonic(), 0
        while True:
            if self.stop.is_set():
                return Result("stopped")
            try:
                rp_job = ep.run({"input": job.input})
                job_id = rp_job.job_id
                job.input = {}  # up to 10 MB of base64: not kept while the job runs
                if self.stop.is_set():
                    self.cancel(job_id)
                    return Result("stopped")
                return job_id
            except RuntimeError as exc:  # the SDK's 401
                raise Fatal(f"the endpoint refused RUNPOD_API_KEY ({short(str(exc), 200)}); "
                            "check the key") from None
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code == 404:
                    raise Fatal(f"endpoint {self.endpoint_id!r} not found at {self.base_url} "
                                "(HTTP 404 on /run); check --endpoint") from None
                if code == 429:
                    self.throttled += 1
                    wait_s = retry_after(exc.response)
                    self.stop.wait(backoff(attempt) if wait_s is None else wait_s)
                    attempt += 1
                    continue
                if 400 <= code < 500 and code != 408:
                    text = short(exc.response.text if exc.response is not None else "", 200)
                    return Result("rejected", reason=f"the endpoint refused the job: HTTP "
                                                     f"{code} on /run ({text})")
                reason = f"HTTP {code} on /run"
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                reason = f"{type(exc).__name__} on /run"
            self.network_errors += 1
            if time.monotonic() - first_try > self.job_timeout:
                return Result("lost", reason=f"could not submit the job for "
                                             f"{self.job_timeout:g} s ({reason})")
            self.stop.wait(backoff(attempt))
            attempt += 1

    def _follow(self, job_id: str) -> Result:
        import requests
        ep = self.endpoint()
        last: tuple | None = None
        changed = time.monotonic()
        attempt = 0
        while True:
            if self.stop.wait(self.poll_s):
                return self._last_look(job_id)
            try:
                state = ep.rp_client.get(f"{self.endpoint_id}/status/{job_id}")
                attempt = 0
            except RuntimeError as exc:
                raise Fatal(f"the endpoint refused RUNPOD_API_KEY ({short(str(exc), 200)})"
                            ) from None
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code == 404:
                    return Result("lost", reason="the endpoint no longer knows the job (status "
                                                 "not found: expired or lost)")
                if code == 429:
                    self.throttled += 1
                    wait_s = retry_after(exc.response)
                    self.stop.wait(backoff(attempt) if wait_s is None else wait_s)
                else:
                    self.network_errors += 1
                    self.stop.wait(backoff(attempt))
                attempt += 1
                state = None
            except requests.exceptions.RetryError:  # the SDK's own 429 retries ran out
                self.throttled += 1
                self.stop.wait(backoff(attempt))
                attempt += 1
                state = None
            except (requests.RequestException, ValueError):
                self.network_errors += 1
                self.stop.wait(backoff(attempt))
                attempt += 1
                state = None
            now = time.monotonic()
            if isinstance(state, dict):
                status = state.get("status")
                progress = state.get("output") if status == "IN_PROGRESS" else None
                sign = (status, progress if isinstance(progress, str) else None)
                if sign != last:
                    last, changed = sign, now
                    self.moved = now
                if status in FINAL_STATES:
                    return Result("state", state)
                if status not in LIVE_STATES:
                    return Result("lost", reason=f"the endpoint answered status "
                                                 f"{short(str(status), 40)}")
            since = changed if last and last[0] == "IN_PROGRESS" else max(changed, self.moved)
            if now - since > self.job_timeout:
                self.cancel(job_id)
                where = last[0] if last else "no answer"
                return Result("lost", reason=f"no progress for {self.job_timeout:g} s "
                                             f"({where}; --job-timeout)")

    def _last_look(self, job_id: str) -> Result:
        """Stopping: a job that has just finished is kept; any other is cancelled."""
        try:
            state = self.endpoint().rp_client.get(f"{self.endpoint_id}/status/{job_id}",
                                                  timeout=5)
            if isinstance(state, dict) and state.get("status") in FINAL_STATES:
                return Result("state", state)
        except Exception:  # noqa: BLE001 - stopping: best effort
            pass
        if self.cancel(job_id) in ("COMPLETED", "FAILED"):  # it finished as we cancelled it
            try:
                state = self.endpoint().rp_client.get(f"{self.endpoint_id}/status/{job_id}",
                                                      timeout=5)
                if isinstance(state, dict) and state.get("status") in FINAL_STATES:
                    return Result("state", state)
            except Exception:  # noqa: BLE001 - stopping: best effort
                pass
        return Result("stopped")

    def cancel(self, job_id: str) -> str | None:
        """Best effort (the job may already be finished or gone); the status it answers."""
        from runpod.endpoint.runner import Job as RpJob
        try:
            answer = RpJob(self.endpoint_id, job_id, self.endpoint().rp_client).cancel()
            return answer.get("status") if isinstance(answer, dict) else None
        except Exception:  # noqa: BLE001 - cancelling is a courtesy; never fatal
            return None


# --- output files ----------------------------------------------------------------------------

class OutputError(Exception):
    """--out holds something this tool did not write."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parse_jsonl(data: bytes, name: str) -> tuple[list[dict], int]:
    """Records of complete lines and the bytes they span (a torn last line is left out)."""
    end = data.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise OutputError(f"{name}: line {n} is not JSON; give --out a file this tool "
                              "wrote, or a new one") from None
        if not isinstance(rec, dict):
            raise OutputError(f"{name}: line {n} is not a JSON object")
        records.append(rec)
    return records, end


def parse_csv(data: bytes, name: str) -> tuple[list[dict], int]:
    """CSV records (header first) and the bytes they span: a record ends at a newline outside
    quotes, so a torn record (or a newline inside a quoted caption) is never taken as whole."""
    good = quotes = start = 0
    while (nl := data.find(b"\n", start)) >= 0:
        quotes += data.count(b'"', start, nl)
        start = nl + 1
        if quotes % 2 == 0:
            good = start
    text = data[:good].decode("utf-8", "replace")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return [], good
    if tuple(rows[0]) != CSV_FIELDS:
        raise OutputError(f"{name}: its header is not {','.join(CSV_FIELDS)}; give --out a "
                          "file this tool wrote, or a new one")
    records = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(CSV_FIELDS):
            raise OutputError(f"{name}: record {n} has {len(row)} columns, not 4")
        records.append(dict(zip(CSV_FIELDS, row)))
    return records, good


class LineFile:
    """An append-only file of records (JSON lines or CSV), written whole job by job."""

    def __init__(self, path: str, kind: str = "jsonl"):
        self.path = path
        self.kind = kind
        self.torn = 0  # bytes of a torn last line dropped at load

    def encode(self, records: Iterable[dict]) -> str:
        if self.kind == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\n")
        for r in records:
            writer.writerow([r.get(k) or "" for k in CSV_FIELDS])
        return buf.getvalue()

    def header(self) -> str:
        return ",".join(CSV_FIELDS) + "\n" if self.kind == "csv" else ""

    def load(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        parse = parse_jsonl if self.kind == "jsonl" else parse_csv
        records, good = parse(data, self.path)
        if good < len(data):
            self.torn = len(data) - good
            with open(self.path, "r+b") as fh:  # a kill mid-write: drop the torn tail
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        return records

    def rewrite(self, records: Sequence[dict]) -> None:
        """Replace the file atomically (temporary file, fsync, rename)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh:
                fh.write(self.header() + self.encode(records))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        text = (self.header() if new else "") + self.encode(records)
        data = text.encode("utf-8", "backslashreplace")  # a lone surrogate stays a JSON escape
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


class Output:
    """One format's files: what is already there (resume) and appending a job's rows."""

    def __init__(self, fmt: str, path: str, items: Sequence[Item]):
        self.fmt = fmt
        self.path = path
        self.main = LineFile(path, "csv" if fmt == "csv" else "jsonl")
        stem = os.path.splitext(path)[0]
        self.errors = LineFile(f"{stem}.errors.jsonl") if fmt == "hf" else None
        self._by_file = {it.file_name: it.key for it in items if it.file_name}
        self._record_dir = os.path.dirname(os.path.abspath(path))
        self.records: list[dict] = []
        self.error_records: list[dict] = []

    def key_of(self, rec: dict) -> tuple[str, str] | None:
        if self.fmt == "hf":
            if "source" in rec:
                return str(rec["source"]), str(rec.get("image_path", ""))
            return self._by_file.get(str(rec.get("file_name")))
        return str(rec.get("source", "")), str(rec.get("image_path", ""))

    @staticmethod
    def is_error(rec: dict) -> bool:
        return bool(rec.get("error"))

    def load(self) -> "Existing":
        self.records = self.main.load()
        self.error_records = self.errors.load() if self.errors else []
        existing = Existing(torn=self.main.torn + (self.errors.torn if self.errors else 0))
        for rec in self.records + self.error_records:
            key = self.key_of(rec)
            if key is None:
                continue
            (existing.failed if self.is_error(rec) else existing.done).add(key)
            existing.sources.add(key[0])
        last = (self.records or [None])[-1]
        existing.tail_source = self.key_of(last)[0] if last and self.key_of(last) else None
        existing.failed -= existing.done
        return existing

    def forget(self, keys: set) -> None:
        """Rewrite the files without the error lines of ``keys`` (they are being retried)."""
        def keep(recs):
            return [r for r in recs if not (self.is_error(r) and self.key_of(r) in keys)]
        kept = keep(self.records)
        if len(kept) != len(self.records):
            self.main.rewrite(kept)
            self.records = kept
        if self.errors is not None:
            kept = keep(self.error_records)
            if len(kept) != len(self.error_records):
                self.errors.rewrite(kept)
                self.error_records = kept

    def write(self, rows: Sequence[Row]) -> list[Row]:
        """Append one job's rows; return them (a txt row whose file cannot be written becomes
        an error row)."""
        if self.fmt == "hf":
            self.main.append([{"file_name": r.item.file_name, "text": r.caption}
                              for r in rows if r.error is None])
            assert self.errors is not None
            self.errors.append([{"file_name": r.item.file_name, "source": r.source,
                                 "image_path": r.image_path, "error": r.error}
                                for r in rows if r.error is not None])
            return list(rows)
        if self.fmt == "txt":
            for r in rows:
                if r.error is None:
                    try:
                        write_caption(r.item.caption_file,
                                      caption_text([r.caption or "", *(r.alternatives or [])]))
                    except OSError as exc:
                        r.error = (f"could not write {os.path.basename(r.item.caption_file)}: "
                                   f"{exc.strerror or exc}")
                        r.caption = r.alternatives = None
        recs = []
        for r in rows:
            rec: dict[str, Any] = {"source": r.source, "image_path": r.image_path}
            if self.fmt == "txt" and r.error is None:
                rec["caption_file"] = os.path.relpath(r.item.caption_file,
                                                      self._record_dir).replace(os.sep, "/")
            if r.error is None:
                rec["caption"] = r.caption
                if r.alternatives is not None and self.fmt != "csv":
                    rec["alternatives"] = r.alternatives
            else:
                rec["error"] = r.error
            recs.append(rec)
        self.main.append(recs)
        return list(rows)


@dataclass
class Existing:
    done: set = field(default_factory=set)  # keys captioned
    failed: set = field(default_factory=set)  # keys recorded with an error
    sources: set = field(default_factory=set)  # sources with any line (zips)
    tail_source: str | None = None  # the source of the file's last line
    torn: int = 0


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Stats:
    images: int = 0  # to do in this run
    captioned: int = 0
    failed: int = 0
    failed_before: int = 0  # error lines kept from earlier runs (no --retry-failed)
    skipped: int = 0  # already in --out
    duplicates: int = 0
    jobs: int = 0
    resubmitted: int = 0  # images sent again
    body_bytes: int = 0  # all /run bodies, resubmissions included
    raw_bytes: int = 0  # inline files as they are on disk
    data_bytes: int = 0  # inline files as encoded (pre-resized or raw)
    preresized: int = 0
    gpu_s: float = 0.0
    seconds: float = 0.0
    client_cpu_s: float = 0.0  # the whole main(), imports of torch (pre-resizing) included
    loop_cpu_s: float = 0.0  # from the first job built to the summary
    throttled: int = 0
    interrupted: bool = False

    def text(self) -> str:
        rate = f", {self.done / self.seconds:.1f} images/s" if self.done and self.seconds else ""
        before = (f" (+{self.failed_before} failed in earlier runs, kept: --retry-failed "
                  "retries them)" if self.failed_before else "")
        dup = f", {self.duplicates} duplicates ignored" if self.duplicates else ""
        saved = self.raw_bytes - self.data_bytes
        pre = (f"; pre-resizing saved {human_size(saved)} ({self.preresized} images)"
               if self.preresized else "")
        return (f"captioned {self.captioned}, failed {self.failed}{before}, skipped "
                f"{self.skipped} (already in --out){dup} in {self.seconds:.1f}s{rate}; "
                f"{self.jobs} jobs, {human_size(self.body_bytes)} sent{pre}; GPU time "
                f"{self.gpu_s:.1f} s (sum of caption_s)"
                + (f"; {self.resubmitted} images resubmitted" if self.resubmitted else "")
                + ("; interrupted" if self.interrupted else ""))

    @property
    def done(self) -> int:
        return self.captioned + self.failed

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["images_per_s"] = self.done / self.seconds if self.seconds else 0.0
        return d


class Run:
    """Plans jobs, keeps ``max_in_flight`` of them on the endpoint, records their outcomes."""

    def __init__(self, args: argparse.Namespace, fields: dict, cfg: Config, items: list[Item],
                 output: Output, existing: Existing, fleet: Fleet, progress, s3=None):
        self.args = args
        self.fields = fields
        self.cfg = cfg
        self.output = output
        self.existing = existing
        self.fleet = fleet
        self.progress = progress
        self.s3 = s3
        self.stats = Stats()
        self.envelope = envelope_bytes(fields)
        self.attempts: dict[tuple[str, str], int] = {}
        self.queue: deque[tuple[Item, Future | None]] = deque()
        self.todo = iter(items)
        self.partial: list[tuple[Item, Prepared]] = []
        self.reported = 0
        threads = max(1, min(8, os.cpu_count() or 1))
        self.prep_pool = ThreadPoolExecutor(threads, thread_name_prefix="prepare")
        self.prep_ahead = 4 * threads
        self.job_pool = ThreadPoolExecutor(args.max_in_flight, thread_name_prefix="job")
        self.running: dict[Future, Job] = {}

    # -- building jobs (main thread) --

    def _prepare(self, item: Item) -> Future | None:
        if item.kind != "file":
            return None
        return self.prep_pool.submit(prepare_file, item, self.args.preresize,
                                     self.args.image_size, self.cfg, self.envelope,
                                     self.args.max_body_bytes)

    def _fill(self) -> None:
        ahead = sum(1 for _, f in self.queue if f is not None)
        room = self.prep_ahead + self.args.images_per_job
        while (ahead < self.prep_ahead and len(self.queue) < room
               and (item := next(self.todo, None)) is not None):
            future = self._prepare(item)
            self.queue.append((item, future))
            ahead += future is not None

    def _entry(self, item: Item) -> Prepared:
        if item.kind == "url":
            return Prepared(item.ref, json_len(item.ref))
        url = self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": item.bucket, "Key": item.ref},
            ExpiresIn=URL_EXPIRY_S)
        return Prepared(url, json_len(url))

    def next_job(self) -> Job | None:
        """The next job when one is ready (full, or nothing more to come), else None."""
        self._fill()
        limit, per_job = self.args.max_body_bytes, self.args.images_per_job
        while self.queue:
            item, future = self.queue[0]
            if item.kind == "zip":
                if self.partial:
                    return self._cut()
                self.queue.popleft()
                return self._zip_job(item)
            if future is not None and not future.done():
                return None
            self.queue.popleft()
            self._fill()
            if item.kind == "bad":
                self._record([Row(item, item.source, item.image_path, error=item.ref)])
                continue
            prepared = future.result() if future is not None else self._entry(item)
            if prepared.error:
                self._record([Row(item, item.source, item.image_path, error=prepared.error)])
                continue
            sizes = [p.entry_bytes for _, p in self.partial] + [prepared.entry_bytes]
            if self.partial and body_bytes(self.envelope, sizes) > limit:
                job = self._cut()
                self.partial = [(item, prepared)]
                return job
            self.partial.append((item, prepared))
            if len(self.partial) >= per_job:
                return self._cut()
        return self._cut() if self.partial else None

    def _cut(self) -> Job:
        pairs, self.partial = self.partial, []
        urls = [p.entry for _, p in pairs]
        fields = {**self.fields, "data_urls": urls}
        labels = {}  # the worker's image_path: data_urls[i] for inline data, else the URL
        for i, (item, prepared) in enumerate(pairs):
            labels[f"data_urls[{i}]" if item.kind == "file" else printable(prepared.entry)] = item
        size = body_bytes(self.envelope, [p.entry_bytes for _, p in pairs])
        return Job([it for it, _ in pairs], fields, size, labels,
                   raw_bytes=sum(p.raw_bytes for _, p in pairs),
                   data_bytes=sum(p.data_bytes for _, p in pairs),
                   preresized=sum(p.preresized for _, p in pairs))

    def _zip_job(self, item: Item) -> Job:
        fields = {**self.fields, "data_url": item.ref}
        return Job([item], fields, json_len({"input": fields}), {printable(item.ref): item})

    def more(self) -> bool:
        return bool(self.queue or self.partial) or self._peek()

    def _peek(self) -> bool:
        item = next(self.todo, None)
        if item is None:
            return False
        self.queue.append((item, self._prepare(item)))
        return True

    # -- outcomes (main thread) --

    def _record(self, rows: Sequence[Row]) -> None:
        rows = self.output.write(rows)
        for r in rows:
            if r.error is None:
                self.stats.captioned += 1
            else:
                self.stats.failed += 1
                self.reported += 1
                if self.reported <= 20:
                    self.progress.write(f"failed: {short(self._clean(r.image_path), 200)}: "
                                        f"{r.error}", file=sys.stderr)
                elif self.reported == 21:
                    self.progress.write("(more failures: see --out)", file=sys.stderr)
        self.progress.update(len(rows))
        self.progress.set_postfix(failed=self.stats.failed, refresh=False)

    def _clean(self, text: str) -> str:
        return _SIGNED.sub("?...", text)

    def _resubmit(self, items: Sequence[Item], reason: str) -> None:
        reason = self._clean(reason)
        again, given_up = [], []
        for item in items:
            n = self.attempts[item.key] = self.attempts.get(item.key, 1) + 1
            (again if n <= self.args.retries + 1 else given_up).append(item)
        if again:
            self.stats.resubmitted += len(again)
            self.progress.write(f"resubmitting {len(again)} images: {reason}", file=sys.stderr)
            for item in reversed(again):
                self.queue.appendleft((item, self._prepare(item)))
        if given_up:
            tries = self.args.retries + 1
            self._record([Row(it, it.source, it.image_path,
                              error=f"{reason} (after {tries} attempt{'s' * (tries > 1)})")
                          for it in given_up])

    def settle(self, job: Job, result: Result) -> None:
        if result.kind == "stopped":
            return
        if result.kind == "rejected":
            self._record([Row(it, it.source, it.image_path, error=result.reason)
                          for it in job.items])
            return
        if result.kind == "lost":
            self._resubmit(job.items, result.reason)
            return
        verdict, reason = classify(result.state)
        output = result.state.get("output")
        if isinstance(output, dict):
            timings = output.get("timings")
            if isinstance(timings, dict) and isinstance(timings.get("caption_s"), (int, float)):
                self.stats.gpu_s += float(timings["caption_s"])
        if verdict == "ok":
            written = self.existing.done | self.existing.failed  # (retried keys were dropped)
            rows, missing = rows_from_output(job, output, written)
            for r in rows:
                r.error = self._clean(r.error) if r.error else None
            if job.zip and not missing:  # the bar counted the zip as one image
                if getattr(self.progress, "total", None) is not None:
                    self.progress.total += len(rows) - 1
                if not rows:
                    self.progress.update(1)  # every member was written before
            self._record(rows)
            if missing:
                self._resubmit(missing, "the worker's answer did not mention these images")
        elif verdict == "retry":
            self._resubmit(job.items, reason)
        else:
            reason = self._clean(reason)
            mine = split_reasons(reason, list(job.labels)) if verdict == "all_failed" else {}
            by_item = {id(it): lab for lab, it in job.labels.items()}
            self._record([Row(it, it.source, it.image_path,
                              error=mine.get(by_item.get(id(it), ""), reason))
                          for it in job.items])

    # -- the loop --

    def loop(self) -> None:
        stop = self.fleet.stop
        try:
            while True:
                while not stop.is_set() and len(self.running) < self.args.max_in_flight:
                    job = self.next_job()
                    if job is None:
                        break
                    self.stats.jobs += 1
                    self.stats.body_bytes += job.body_bytes
                    self.stats.raw_bytes += job.raw_bytes
                    self.stats.data_bytes += job.data_bytes
                    self.stats.preresized += job.preresized
                    self.running[self.job_pool.submit(self.fleet.run, job)] = job
                if not self.running and (stop.is_set() or not self.more()):
                    break
                waiting = list(self.running)
                if self.queue and self.queue[0][1] is not None and not stop.is_set():
                    waiting.append(self.queue[0][1])
                if not waiting:
                    continue
                done, _ = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    job = self.running.pop(future, None)
                    if job is not None:
                        self.settle(job, future.result())  # Fatal propagates
        finally:
            stop.set()
            for future, job in list(self.running.items()):
                try:
                    result = future.result(timeout=30)
                except Exception:  # noqa: BLE001 - stopping; what finished is written
                    continue
                if result.kind == "state":  # finished as we stopped: keep it
                    try:
                        self.settle(job, result)
                    except Exception:  # noqa: BLE001 - stopping
                        pass
            self.job_pool.shutdown(wait=False, cancel_futures=True)
            self.prep_pool.shutdown(wait=False, cancel_futures=True)


# --- command line ----------------------------------------------------------------------------

def _positive(kind, lo, hi=None):
    def parse(text: str):
        value = kind(text)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be from {lo} to {hi} (got {text})" if hi is not None else
                f"must be at least {lo} (got {text})")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="caption_dataset.py",
        description="Caption a dataset (folders, URL lists, s3:// prefixes, zip URLs) on a "
                    "RunPod endpoint of this worker, writing one line per image; rerun the same "
                    "command to resume. RUNPOD_API_KEY comes from the environment.")
    p.add_argument("sources", metavar="SOURCE", nargs="+",
                   help="a folder of images, a URL list (.txt, .csv or .jsonl with a url "
                        "column/key), s3://bucket/prefix, or an http(s) URL of a zip")
    p.add_argument("--endpoint", required=True, metavar="ID", help="RunPod endpoint id")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output file (appended to; resumed from). For --format hf: "
                        "FOLDER/metadata.jsonl; for txt: the run's record")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl (default): one JSON line per image; csv: source,image_path,"
                        "caption,error; hf: datasets imagefolder metadata.jsonl; txt: "
                        "<stem>.txt beside each image")
    p.add_argument("--retry-failed", action="store_true",
                   help="also retry images recorded with an error in --out")
    p.add_argument("--images-per-job", type=_positive(int, 1), default=IMAGES_PER_JOB,
                   metavar="N", help=f"most images per job (default {IMAGES_PER_JOB}: one GPU "
                                     "batch on an 80 GB GPU)")
    p.add_argument("--max-in-flight", type=_positive(int, 1, 1000), default=MAX_IN_FLIGHT,
                   metavar="N", help=f"most jobs on the endpoint at once (default "
                                     f"{MAX_IN_FLIGHT})")
    p.add_argument("--retries", type=_positive(int, 0, 100), default=RETRIES, metavar="N",
                   help=f"resubmissions of a lost or failed job (default {RETRIES})")
    p.add_argument("--job-timeout", type=_positive(float, 1), default=JOB_TIMEOUT_S,
                   metavar="S", help="seconds without any change before a job counts as lost "
                                     f"(default {JOB_TIMEOUT_S:g})")
    p.add_argument("--poll-interval", type=_positive(float, 0.05, 60), default=POLL_INTERVAL_S,
                   metavar="S", help=f"seconds between /status calls per job (default "
                                     f"{POLL_INTERVAL_S:g})")
    p.add_argument("--preresize", action=argparse.BooleanOptionalAction, default=True,
                   help="resize local images to the model's input size before sending, as the "
                        "worker would (same captions, fewer bytes); default on")
    p.add_argument("--image-size", type=_positive(int, 16, 4096), default=IMAGE_SIZE,
                   metavar="PX", help=f"the endpoint model's input size (default {IMAGE_SIZE}, "
                                      "caption_coco_opt2.7b)")
    p.add_argument("--max-body-bytes", type=_positive(int, 1000, MAX_BODY_BYTES),
                   default=MAX_BODY_BYTES, metavar="N",
                   help=f"largest /run body (default {MAX_BODY_BYTES:,}, RunPod's limit)")
    p.add_argument("--stats", metavar="FILE", help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_request_flags(p)
    return p


def request_fields(args: argparse.Namespace, cfg: Config) -> dict:
    """The request flags given, checked by the worker's schema (JobError names the flags)."""
    parse_options(args, cfg)
    given = {s.name: getattr(args, s.name) for s in FLAG_FIELDS
             if getattr(args, s.name) is not None}
    if args.images_per_job > cfg.max_images_per_job:
        raise JobError(f"invalid options: --images-per-job {args.images_per_job} is over the "
                       f"worker's limit of {cfg.max_images_per_job} images per job "
                       f"({ENV['max_images_per_job']}; set it here as on the endpoint to "
                       "raise it)")
    return given


def client_config() -> Config:
    """The worker's settings as far as the client uses them (image limits, images per job).
    The BUCKET_* names only locate an s3:// source here, so the worker's rule that all four
    are set together (for caption zips) does not apply."""
    skip = {ENV[f] for f in BUCKET_FIELDS}
    return Config.from_env({k: v for k, v in os.environ.items() if k not in skip})


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, text: str, file=None) -> None:
        print(text, file=file or sys.stderr)
    def close(self) -> None: ...


def _install_signals(stop: threading.Event, caught: list) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, frame):
        if stop.is_set() and caught:
            raise KeyboardInterrupt
        caught.append(signum)
        stop.set()
        print("\nstopping: cancelling the jobs in flight (Ctrl-C again to quit at once)",
              file=sys.stderr)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def main(argv: Sequence[str] | None = None) -> int:
    started_cpu = time.process_time()
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        cfg = client_config()
        fields = request_fields(args, cfg)
    except ConfigError as exc:
        return _usage(str(exc))
    except JobError as exc:
        return _usage(exc.message)
    key = os.environ.get("RUNPOD_API_KEY", "")
    if not key:
        return _usage("set RUNPOD_API_KEY in the environment (it is never taken as a flag)")
    import runpod
    base = os.environ.get("RUNPOD_ENDPOINT_BASE_URL") or runpod.endpoint_url_base
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        return _usage(f"--out {args.out}: the folder {out_dir} does not exist")
    s3 = None
    try:
        if any(s.lower().startswith("s3://") for s in args.sources):
            s3 = s3_client()
        items, duplicates = plan_items(args.sources, args.format, args.out, s3)
        output = Output(args.format, args.out, items)
        existing = output.load()
    except (UsageError, OutputError) as exc:
        return _usage(str(exc))
    except OSError as exc:
        return _usage(f"{exc.filename or args.out}: {exc.strerror or exc}")
    if existing.torn:
        print(f"note: dropped a torn last line ({existing.torn} bytes) from {args.out} "
              "(an earlier run was killed while writing)", file=sys.stderr)
    todo, skipped = [], 0
    retry_keys: set = set()
    for item in items:
        if item.kind == "zip":
            failed = any(k[0] == item.source for k in existing.failed)
            if args.retry_failed and failed:
                retry_keys |= {k for k in existing.failed if k[0] == item.source}
            elif item.source in existing.sources and existing.tail_source != item.source:
                skipped += 1
                continue
            todo.append(item)
        elif item.key in existing.done:
            skipped += 1
        elif item.key in existing.failed and not args.retry_failed:
            skipped += 1
        else:
            if item.key in existing.failed:
                retry_keys.add(item.key)
            todo.append(item)
    try:
        if retry_keys:
            output.forget(retry_keys)
            existing.failed -= retry_keys
    except OSError as exc:
        return _usage(f"{args.out}: {exc.strerror or exc}")
    planned = {it.key for it in items} | {k for k in existing.failed
                                          if k[0] in {it.source for it in items
                                                      if it.kind == "zip"}}
    if args.preresize and any(it.kind == "file" for it in todo):
        import preprocess  # noqa: F401 - torch loads here, once, not in the first job's thread
    stop = threading.Event()
    caught: list = []
    restore = _install_signals(stop, caught)
    fleet = Fleet(args.endpoint, key, base.rstrip("/"), args.poll_interval, args.job_timeout,
                  stop)
    if args.quiet or not todo:
        bar = _NoBar()
    else:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="img", desc="captioning", file=sys.stderr,
                   dynamic_ncols=True)
    run = Run(args, fields, cfg, todo, output, existing, fleet, bar, s3)
    run.stats.skipped, run.stats.duplicates, run.stats.images = skipped, duplicates, len(todo)
    started, loop_cpu = time.monotonic(), time.process_time()
    code = EXIT_OK
    try:
        run.loop()
    except Fatal as exc:
        bar.write(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        caught.append(signal.SIGINT)
    except OSError as exc:
        bar.write(f"error: writing {args.out}: {exc.strerror or exc}", file=sys.stderr)
        code = EXIT_USAGE
    finally:
        restore()
        bar.close()
    stats = run.stats
    stats.seconds = time.monotonic() - started
    stats.client_cpu_s = time.process_time() - started_cpu
    stats.loop_cpu_s = time.process_time() - loop_cpu
    stats.throttled = fleet.throttled
    stats.failed_before = len(existing.failed & planned) if not args.retry_failed else 0
    stats.interrupted = bool(caught)
    print(stats.text())
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as fh:
            json.dump(stats.as_dict(), fh, indent=1)
    if caught:
        return 128 + int(caught[0])
    if code:
        return code
    return EXIT_FAILED if stats.failed or stats.failed_before else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
