"""Worker configuration: one frozen object built from environment variables.

Every setting is declared once in ``SETTINGS`` (env var, type, default, bounds, one-line doc).
``Config.from_env()`` reads and validates all of them and raises ``ConfigError`` listing every
bad value, so the worker exits with a clear message before it takes a job. The README's
environment table is checked against ``SETTINGS`` by a test, so docs and code cannot drift.

No torch, no runpod, no I/O at import.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b-coco"
INJECT_MISMATCH_PARTS = ("", "fast", "graphs")  # BLIP_INJECT_DECODER_MISMATCH
MB = 1024 * 1024
GB = 1024 * MB


class ConfigError(ValueError):
    """A setting has a value the worker cannot run with. The message names every such setting."""


@dataclass(frozen=True)
class Setting:
    field: str  # attribute on Config
    env: str  # environment variable
    kind: str  # "str" | "int" | "float" | "bool" | "choice" | "opt_int"
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()


SETTINGS: tuple[Setting, ...] = (
    # --- model -------------------------------------------------------------------------------
    Setting("model", "BLIP_MODEL", "str", DEFAULT_MODEL,
            "Hugging Face repo id or local directory of the model; `tiny-random` (tests, CPU) or "
            "`random-full` (real architecture, random weights; benchmarks)."),
    Setting("engine", "BLIP_ENGINE", "choice", "transformers",
            "Captioning backend.", choices=("transformers", "lavis")),
    Setting("dtype", "BLIP_DTYPE", "choice", "auto",
            "Model dtype; `auto` = float16 on CUDA (LAVIS parity), float32 on CPU.",
            choices=("auto", "float16", "bfloat16", "float32")),
    Setting("device", "BLIP_DEVICE", "str", "auto",
            "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`."),
    Setting("max_batch_size", "BLIP_MAX_BATCH_SIZE", "int", 0,
            "Largest GPU batch (images); 0 = chosen from free GPU memory at load (8 on CPU). "
            "A request's `batch_size` caps it further.", lo=0, hi=1024),
    Setting("inject_oom_above_batch", "BLIP_INJECT_OOM_ABOVE_BATCH", "opt_int", None,
            "Chaos knob: any generate call with more images than this raises an out-of-memory "
            "error (also on CPU). Unset in production.", lo=0, hi=100000),
    Setting("inject_cuda_error_prompt", "BLIP_INJECT_CUDA_ERROR_PROMPT", "str", "",
            "Chaos knob: a batch with a row whose prompt equals this text fails as a corrupted "
            "CUDA context would (the job answers with refresh_worker). Unset in production."),
    Setting("decoder", "BLIP_DECODER", "choice", "fast",
            "Decoding loop of the transformers engine: `fast` (prompt prefilled once per image "
            "and shared by its beams; same tokens as transformers) or `hf` (transformers' own "
            "generate). A model whose generation config sets something `fast` does not "
            "implement runs on `hf`, and a warning names the setting.", choices=("fast", "hf")),
    Setting("cuda_graphs", "BLIP_CUDA_GRAPHS", "bool", True,
            "With the fast decoder on CUDA, capture each batch shape's decoding step as a CUDA "
            "graph and replay it, while its buffers fit in 15% of GPU memory (cuts per-token "
            "CPU overhead)."),
    Setting("warmup", "BLIP_WARMUP", "bool", True,
            "Run one tiny caption after loading so the first job is not slow."),
    Setting("self_check", "BLIP_SELF_CHECK", "bool", True,
            "After loading, caption a few built-in images with the fast decoder as configured "
            "and compare its tokens with a reference that must be identical (on CUDA the same "
            "decoder run eagerly, at the same padded shapes; on a CPU transformers' generate). "
            "On a difference or an error, CUDA graphs, then the fast decoder, are switched off "
            "and a warning says what differed; the ready line reports the outcome."),
    Setting("inject_decoder_mismatch", "BLIP_INJECT_DECODER_MISMATCH", "str", "",
            "Chaos knob: `fast` makes the fast decoder's tokens wrong, `graphs` only while CUDA "
            "graphs are on, so the self-check must catch it and switch that part off. Unset in "
            "production."),
    Setting("batch_wait_ms", "BLIP_BATCH_WAIT_MS", "float", 5.0,
            "How long the GPU loop waits for the next image to fill a batch across jobs: "
            "again after each arrival, at most 4 times this in all, and only while a running "
            "job may still send images (a lone image starts at once).",
            lo=0, hi=1000),
    Setting("max_concurrent_jobs", "MAX_CONCURRENT_JOBS", "int", 0,
            "Jobs a worker runs at once (RunPod concurrency); their images share GPU batches. "
            "0 = as many as one batch of the largest size holds (the auto or set "
            "`BLIP_MAX_BATCH_SIZE`), at least 16 and at most 64.",
            lo=0, hi=256),
    Setting("decode_workers", "DECODE_WORKERS", "int", 0,
            "Threads decoding and preprocessing images; 0 = number of CPU cores (max 16).",
            lo=0, hi=128),
    # --- inputs ------------------------------------------------------------------------------
    Setting("max_images_per_job", "MAX_IMAGES_PER_JOB", "int", 1000,
            "Most images one job may contain (URLs in `data_urls`, members of a zip).",
            lo=1, hi=1_000_000),
    Setting("max_image_bytes", "MAX_IMAGE_BYTES", "int", 50 * MB,
            "Largest image download or inline image, in bytes.", lo=1),
    Setting("max_zip_bytes", "MAX_ZIP_BYTES", "int", 2 * GB,
            "Largest zip download or inline zip, in bytes.", lo=1),
    Setting("max_zip_uncompressed_bytes", "MAX_ZIP_UNCOMPRESSED_BYTES", "int", 4 * GB,
            "Largest total uncompressed size of one zip's members, in bytes.", lo=1),
    Setting("max_zip_ratio", "MAX_ZIP_RATIO", "float", 100.0,
            "Largest compression ratio of one zip member (zip-bomb guard).", lo=1),
    Setting("max_image_pixels", "MAX_IMAGE_PIXELS", "int", 120_000_000,
            "Largest image in pixels (decompression-bomb guard; 120 MP lets 108 MP photos pass).",
            lo=1),
    Setting("download_concurrency", "DOWNLOAD_CONCURRENCY", "int", 16,
            "Parallel downloads per job (each job fetches at most twice this many sources "
            "ahead of the images it has handed to decoding).", lo=1, hi=256),
    Setting("connect_timeout_s", "DOWNLOAD_CONNECT_TIMEOUT_S", "float", 10.0,
            "Seconds to establish a connection.", lo=0.01, hi=600),
    Setting("read_timeout_s", "DOWNLOAD_READ_TIMEOUT_S", "float", 30.0,
            "Seconds a download may stall without receiving a byte.", lo=0.01, hi=3600),
    Setting("low_speed_limit", "DOWNLOAD_LOW_SPEED_LIMIT", "int", 1024,
            "Bytes per second a download must average over `DOWNLOAD_LOW_SPEED_TIME_S`, or it is "
            "cut and retried like a stall (curl's --speed-limit; a server that drips bytes never "
            "trips the read timeout). Body bytes count; headers still arriving after the window "
            "count as too slow. 0 = off.", lo=0, hi=10**9),
    Setting("low_speed_time_s", "DOWNLOAD_LOW_SPEED_TIME_S", "float", 30.0,
            "Seconds over which `DOWNLOAD_LOW_SPEED_LIMIT` is averaged (curl's --speed-time).",
            lo=0.1, hi=3600),
    Setting("download_deadline_s", "DOWNLOAD_DEADLINE_S", "float", 300.0,
            "Total seconds allowed for one file, retries included.", lo=0.01, hi=86400),
    Setting("download_retries", "DOWNLOAD_RETRIES", "int", 3,
            "Retries after a connection error, a 5xx, 408 or 429 answer (honouring Retry-After); "
            "never after another 4xx.", lo=0, hi=20),
    Setting("retry_backoff_s", "DOWNLOAD_RETRY_BACKOFF_S", "float", 0.5,
            "First retry delay in seconds; doubles on each retry.", lo=0, hi=60),
    Setting("work_dir", "WORK_DIR", "str", "",
            "Parent directory for each job's private temporary directory; empty = system temp."),
    # --- caption zips (output_format "zip") ---------------------------------------------------
    Setting("bucket_endpoint_url", "BUCKET_ENDPOINT_URL", "str", "",
            "S3-compatible endpoint for caption zips (`output_format: zip`). With the three "
            "settings below, zips are uploaded and returned as `captions_zip_url` (a presigned "
            "link, valid 7 days); unset, they are returned inline. Set all four or none."),
    Setting("bucket_access_key_id", "BUCKET_ACCESS_KEY_ID", "str", "",
            "Access key id for `BUCKET_ENDPOINT_URL`."),
    Setting("bucket_secret_access_key", "BUCKET_SECRET_ACCESS_KEY", "str", "",
            "Secret access key for `BUCKET_ENDPOINT_URL` (never logged)."),
    Setting("bucket_name", "BUCKET_NAME", "str", "",
            "Bucket the caption zips go to, as `<job id>/captions.zip`."),
    Setting("max_inline_zip_bytes", "MAX_INLINE_ZIP_BYTES", "int", 5 * MB,
            "Largest caption zip returned inline (base64, a third larger) when no bucket is set; "
            "a larger one is reported in `captions_zip_error`. RunPod refuses results over "
            "about 20 MB.", lo=0, hi=10 * MB),
    Setting("log_level", "BLIP_LOG_LEVEL", "choice", "INFO",
            "Log level of the worker's own messages.", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)


def _parse(s: Setting, raw: str) -> Any:
    raw = raw.strip()
    if s.kind == "str":
        return raw
    if s.kind == "choice":
        if raw not in s.choices:
            raise ValueError(f"must be one of {', '.join(s.choices)}")
        return raw
    if s.kind == "bool":
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false")
    if s.kind == "opt_int" and raw == "":
        return None
    if s.kind in ("int", "opt_int"):
        try:
            value: float = int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
    elif s.kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if value != value:  # NaN
            raise ValueError("must be a number")
    else:  # pragma: no cover - programming error
        raise AssertionError(s.kind)
    if s.lo is not None and value < s.lo:
        raise ValueError(f"must be at least {s.lo:g}")
    if s.hi is not None and value > s.hi:
        raise ValueError(f"must be at most {s.hi:g}")
    return value


@dataclass(frozen=True)
class Config:
    model: str
    engine: str
    dtype: str
    device: str
    max_batch_size: int
    inject_oom_above_batch: int | None
    inject_cuda_error_prompt: str
    decoder: str
    cuda_graphs: bool
    warmup: bool
    self_check: bool
    inject_decoder_mismatch: str
    batch_wait_ms: float
    max_concurrent_jobs: int
    decode_workers: int
    max_images_per_job: int
    max_image_bytes: int
    max_zip_bytes: int
    max_zip_uncompressed_bytes: int
    max_zip_ratio: float
    max_image_pixels: int
    download_concurrency: int
    connect_timeout_s: float
    read_timeout_s: float
    low_speed_limit: int
    low_speed_time_s: float
    download_deadline_s: float
    download_retries: int
    retry_backoff_s: float
    work_dir: str
    bucket_endpoint_url: str
    bucket_access_key_id: str
    bucket_secret_access_key: str = dataclasses.field(repr=False)
    bucket_name: str
    max_inline_zip_bytes: int
    log_level: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Config":
        """Read every setting from ``environ`` (default ``os.environ``); raise ConfigError."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is None or (raw.strip() == "" and s.kind != "str"):
                values[s.field] = s.default
                continue
            try:
                values[s.field] = _parse(s, raw)
            except ValueError as exc:
                shown = raw if len(raw) <= 40 else raw[:40] + "..."
                problems.append(f"{s.env}={shown!r}: {exc} ({s.doc.split('.')[0]}).")
        if values.get("model", "").strip() == "":
            problems.append("BLIP_MODEL is empty: set a Hugging Face repo id, a local directory, "
                            "`tiny-random` or `random-full`.")
        device = values.get("device", "auto")
        if device not in ("auto", "cpu", "cuda") and not (
                device.startswith("cuda:") and device[5:].isdigit()):
            problems.append(f"BLIP_DEVICE={device!r}: must be auto, cpu, cuda or cuda:N.")
        if values.get("inject_decoder_mismatch") not in INJECT_MISMATCH_PARTS:
            problems.append(f"BLIP_INJECT_DECODER_MISMATCH={values['inject_decoder_mismatch']!r}"
                            ": must be fast, graphs or unset (a chaos knob, unset in production).")
        problems += _bucket_problems(values)
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return cls(**values)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def decode_threads(self) -> int:
        """DECODE_WORKERS, or the number of CPU cores (at most 16) when it is 0."""
        return self.decode_workers or min(16, os.cpu_count() or 1)


# Each setting's environment variable, by Config field (for messages that name the variable).
ENV: dict[str, str] = {s.field: s.env for s in SETTINGS}

BUCKET_FIELDS = ("bucket_endpoint_url", "bucket_access_key_id", "bucket_secret_access_key",
                 "bucket_name")


def _bucket_problems(values: Mapping[str, Any]) -> list[str]:
    """The four bucket settings go together: all set (caption zips are uploaded) or none."""
    env = ENV
    given = [f for f in BUCKET_FIELDS if values.get(f)]
    if not given:
        return []
    problems = []
    if len(given) < len(BUCKET_FIELDS):
        missing = ", ".join(env[f] for f in BUCKET_FIELDS if f not in given)
        problems.append(f"{missing} unset while {', '.join(env[f] for f in given)} set: caption "
                        "zips are uploaded only when all four are set; set the missing ones, or "
                        "unset them all to return caption zips inline.")
    url = values.get("bucket_endpoint_url", "")
    if url and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url, re.IGNORECASE):
        problems.append("BUCKET_ENDPOINT_URL: must be an http(s) URL such as "
                        "https://s3.example.com.")
    return problems


def defaults() -> Config:
    """The configuration with every setting at its default (tests, docs)."""
    return Config.from_env({})


# Keep the dataclass fields and SETTINGS in lockstep (checked at import: pure, cheap).
assert [f.name for f in dataclasses.fields(Config)] == [s.field for s in SETTINGS]



def markdown_table() -> str:
    """The README's environment table, generated from ``SETTINGS`` (a test keeps them equal)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        if s.kind == "choice":
            default = f"`{s.default}` ({' / '.join(s.choices)})"
        elif s.kind == "bool":
            default = f"`{'true' if s.default else 'false'}`"
        elif s.default in (None, ""):
            default = "unset"
        else:
            default = f"`{s.default}`"
        rows.append(f"| `{s.env}` | {default} | {s.doc} |")
    return "\n".join(rows)
