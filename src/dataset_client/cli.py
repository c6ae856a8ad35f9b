"""The command line: flags, checks before anything is sent, the progress bar, Ctrl-C, the summary
and the exit codes.

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
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

from caption_folder import FLAG_FIELDS, add_request_flags, parse_options
from config import BUCKET_FIELDS, ENV, Config, ConfigError
from errors import JobError

from .endpoint import Fatal, Fleet
from .fanout import Run
from .outfiles import FORMATS, Existing, Output, OutputError
from .packing import MAX_BODY_BYTES
from .sources import UsageError, plan_items, s3_client
from .work import Item

IMAGES_PER_JOB = 256
MAX_IN_FLIGHT = 32
RETRIES = 3
JOB_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 1.0
IMAGE_SIZE = 364  # caption_coco_opt2.7b's (and tiny-random's) input size
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


def plan(items: Sequence[Item], existing: Existing,
         retry_failed: bool) -> tuple[list[Item], int, set]:
    """What this run sends: (the items to do, how many are skipped, the error keys to retry).
    An image is skipped when it has a line (an error line unless ``--retry-failed``). A zip (a
    zip source, or a URL of a list that turned out to be one: its lines are its members') is
    skipped only when listed complete (``<out>.zips.json``), unless ``--retry-failed`` and it has
    error lines; one not listed runs again, and only its members without a line are added."""
    errors: dict[str, set] = {}  # a source's error keys: its own, or its members'
    for key in existing.failed:
        errors.setdefault(key[0], set()).add(key)
    todo, skipped, retry = [], 0, set()
    for item in items:
        if retry_failed and item.source in errors:
            retry |= errors[item.source]
            todo.append(item)
        elif (item.key in existing.done or item.key in existing.failed
              or item.source in existing.complete):
            skipped += 1
        else:
            todo.append(item)
    return todo, skipped, retry


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
    todo, skipped, retry_keys = plan(items, existing, args.retry_failed)
    try:
        if retry_keys:
            output.forget(retry_keys)
            existing.failed -= retry_keys
    except OSError as exc:
        return _usage(f"{args.out}: {exc.strerror or exc}")
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
    quit_now = False
    try:
        run.loop()
    except Fatal as exc:
        bar.write(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C (or one before the handler was installed)
        caught.append(signal.SIGINT)
        quit_now = True
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
    planned = {it.source for it in items}
    stats.failed_before = (sum(k[0] in planned for k in existing.failed)
                           if not args.retry_failed else 0)
    stats.interrupted = bool(caught)
    print(stats.text())
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as fh:
            json.dump(stats.as_dict(), fh, indent=1)
    if quit_now:  # job threads may still wait inside SDK calls: do not join them at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(caught[0]))
    if caught:
        return 128 + int(caught[0])
    if code:
        return code
    return EXIT_FAILED if stats.failed or stats.failed_before else EXIT_OK
