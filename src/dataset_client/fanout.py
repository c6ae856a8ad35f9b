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

Jobs (decisions):
- ``--images-per-job`` (default 256) caps every job: one full GPU batch on an 80 GB GPU, so the
  per-job overhead amortises while a resubmitted job re-runs at most 256 images, and a
  10,000-image dataset spreads over 40 jobs for the autoscaler. Inline jobs are also packed so
  the /run body, measured as the SDK sends it (``json.dumps`` of ``{"input": ...}``, default
  separators), stays at most ``--max-body-bytes`` (RunPod's 10,000,000). A file that does not
  fit alone gets a per-image error naming the limit and what to do.
- Requests: the request flags are ``caption_folder.py``'s (``schema.FIELDS``), checked by the
  worker's own ``schema.parse_request`` before anything is sent; only the flags given are sent.
- Ctrl-C (or SIGTERM): stop submitting, cancel the jobs in flight through the API, write what
  finished, print the summary, exit 130 (143). A second Ctrl-C stops at once.

Summary on stdout (captioned, failed, skipped, images/s, bytes sent and saved by pre-resizing,
GPU seconds = the sum of the workers' ``caption_s``); ``--stats FILE`` also writes it as JSON.
Exit codes as ``caption_folder.py``: 0; 1 when any image is recorded with an error (now or in an
earlier run and not retried); 2 for bad flags, sources, settings, key or endpoint; 130 after
Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from caption_folder import FLAG_FIELDS, add_request_flags, parse_options
from config import BUCKET_FIELDS, ENV, Config, ConfigError
from errors import JobError, short
from inputs import human_size, printable

from .endpoint import Fatal, Fleet
from .outcomes import classify, rows_from_output, split_reasons
from .outfiles import FORMATS, Existing, Output, OutputError
from .packing import MAX_BODY_BYTES, body_bytes, envelope_bytes, json_len, prepare_file
from .sources import UsageError, plan_items, s3_client
from .work import Item, Job, Prepared, Result, Row

IMAGES_PER_JOB = 256
MAX_IN_FLIGHT = 32
RETRIES = 3
JOB_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 1.0
IMAGE_SIZE = 364  # caption_coco_opt2.7b's (and tiny-random's) input size
URL_EXPIRY_S = 24 * 3600
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_SIGNED = re.compile(r"\?[^\s'\")]*X-Amz-[^\s'\")]*")  # presigned query strings in messages


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

