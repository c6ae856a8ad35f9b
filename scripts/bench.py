"""Benchmark: prints one JSON object per measurement (JSON lines) on stdout.

    python scripts/bench.py --model tiny-random --mode engine --batch-sizes 1,8,32
    python scripts/bench.py --model random-full --mode engine --batch-sizes 1,4,16,64,256 \\
        --num-beams 3 --new-tokens 12 --decoders fast,hf --compare-naive
    python scripts/bench.py --model random-full --mode job --images 512
    python scripts/bench.py --model random-full --mode concurrent --images 64
    python scripts/bench.py --model tiny-random --mode pipeline --images 256 --image-size 640x480
    python scripts/bench.py --model tiny-random --mode api --images 32

Modes:
- ``engine``: one ``generate`` call per batch size on preprocessed images; images/s and batch
  latency p50/p95, per decoder (``--decoders fast,fast-base,hf``: ``fast-base`` is the fast
  decoder without step overlap, encoder graphs and fused q/k/v); ``--compare-naive`` adds the seed
  worker's loop (decode, preprocess and caption one image at a time, transformers' generate)
  and prints the ratio.
- ``job``: one job of ``--images`` decoded images through the GPU batcher (what a zip job does
  once its images are decoded); per ``--decoders`` variant and ``--staging`` (pinned, host).
- ``concurrent``: ``--images`` one-image jobs submitted at once from as many threads through
  the batcher, against the same images one job after another; prints the ratio, and how many
  jobs a deployed worker with the same settings would run at once (``MAX_CONCURRENT_JOBS``).
- ``pipeline``: a zip of ``--images`` synthetic JPEGs (``--image-size``) through the whole
  worker (``jobs.Worker.run``: data: URI, unzip, decode, preprocess, caption), against the pure
  decode + preprocess rate of the same images with the same number of threads; also the
  captioning-alone rate and the best ratio they allow (on a CPU both share the cores).
- ``api``: the real local API (``src/handler.py --rp_serve_api``) in a subprocess, with the
  worker settings of the bench's environment; ``--images`` one-image jobs posted at once to
  /runsync (three rounds), against one after another.
- ``load``: model load and warm-up time.

Worker settings in the environment apply to every mode, as to the worker (e.g.
``BLIP_CUDA_GRAPHS=0 python scripts/bench.py ...``), and each row lists them under ``settings``.

Random weights never stop early, so ``--new-tokens K`` forces exactly K new tokens
(min_length = max_length = K): every variant does the same work as the real checkpoint
writing a K-token caption. Images are synthetic JPEGs made in memory (gradients + noise).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
sys.path.insert(0, SRC)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import config  # noqa: E402
import engines as engine_mod  # noqa: E402
from params import DEFAULT_PROMPT, GenerationParams  # noqa: E402


# --- output -------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


class Report:
    def __init__(self, args, device: torch.device, out_path: str | None):
        # settings: the worker's environment variables this run had (worker_env)
        self.common = {"model": args.model, "settings": worker_env() or "defaults",
                       "device": _device_name(device),
                       "date": time.strftime("%Y-%m-%d"), "versions": versions()}
        self.file = open(out_path, "a") if out_path else None

    def emit(self, **fields) -> dict:
        row = {**fields, **self.common}
        line = json.dumps(row)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        return row


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- inputs -------------------------------------------------------------------------------
def synthetic_jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: colour gradients plus noise, different per image."""
    w, h = size
    out = []
    for i in range(n):
        gx = Image.linear_gradient("L").resize((w, h)).rotate(17 * (i + seed), expand=False)
        noise = Image.effect_noise((w, h), 20 + (i % 40))
        gy = Image.radial_gradient("L").resize((w, h))
        img = Image.merge("RGB", (gx, noise, gy)).point(lambda v, s=i: (v + 37 * s) % 256)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (364, 364))
    return img.convert("RGB")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)


def release() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --- modes --------------------------------------------------------------------------------
def worker_env() -> dict[str, str]:
    """The worker settings set in this environment (``BLIP_CUDA_GRAPHS=0``, ``BLIP_DTYPE``, ...,
    every variable of ``config.SETTINGS``): every mode runs with them, as the worker would, and
    each row reports them; the bench's own flags (``--model``, ``--dtype``, a mode's batch
    limit) override them."""
    return {s.env: os.environ[s.env] for s in config.SETTINGS if s.env in os.environ}


def decode_options(args, cfg: config.Config, changes: dict | None = None):
    """The fast decoder's options for an engine of ``cfg``: the engine's own (None) unless the
    variant (``changes``) or the caller of ``main`` (its ``decode``) changes some of their
    fields (``generation.DecodeOptions``)."""
    changes = {**args.decode, **(changes or {})}
    if not changes:
        return None
    own = engine_mod.decode_options(cfg, engine_mod.resolve_device(cfg.device))
    return dataclasses.replace(own, **changes)


def make_engine(args, decode: dict | None = None, **env) -> engine_mod.BaseEngine:
    settings = {**worker_env(), "BLIP_MODEL": args.model, "BLIP_WARMUP": "1"}
    if args.dtype:
        settings["BLIP_DTYPE"] = args.dtype
    settings.update(env)
    cfg = config.Config.from_env(settings)
    return engine_mod.load_engine(cfg, decode_options(args, cfg, decode))


# --decoders: the engine variants a benchmark can compare in one run, as worker settings and
# changes to the fast decoder's options
VARIANTS = {
    "fast": ({"BLIP_DECODER": "fast"}, {}),
    # the fast decoder before its step overlap, encoder graphs and fused q/k/v: a host round
    # trip per step, image encoding and prefill launched eagerly, separate q/k/v projections
    # (same tokens)
    "fast-base": ({"BLIP_DECODER": "fast"},
                  {"overlap": False, "encode_graphs": False, "fuse_qkv": False}),
    "hf": ({"BLIP_DECODER": "hf"}, {}),
}
COMPARE = (("fast", "hf"), ("fast", "fast-base"))


def make_variant(args, name: str, **env) -> engine_mod.BaseEngine:
    if name not in VARIANTS:
        raise SystemExit(f"--decoders: unknown variant {name!r}; use {', '.join(VARIANTS)}")
    settings, decode = VARIANTS[name]
    return make_engine(args, decode, **settings, **env)


def params_of(args) -> GenerationParams:
    k = args.new_tokens
    return GenerationParams(num_beams=args.num_beams, max_length=k, min_length=k)


def mode_engine(args, report: Report) -> None:
    params = params_of(args)
    jpegs = synthetic_jpegs(max(args.batch_sizes), args.image_size)
    rates: dict[tuple[str, int], float] = {}
    for decoder in args.decoders:
        eng = make_variant(args, decoder, BLIP_MAX_BATCH_SIZE="1024")
        pixels = [eng.preprocess(decode(j)) for j in jpegs]
        for b in args.batch_sizes:
            try:
                # warm this shape
                eng.generate_batch(eng.collate(pixels[:b]), [DEFAULT_PROMPT] * b, params)
                sync(eng.device)
                reset_peak(eng.device)
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    eng.generate_batch(eng.collate(pixels[:b]), [DEFAULT_PROMPT] * b, params)
                    sync(eng.device)
                    times.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - report and go on (e.g. OOM at a size)
                report.emit(mode="engine", decoder=decoder, batch=b, error=f"{type(exc).__name__}: {str(exc)[:200]}")
                eng.free_memory()
                continue
            rate = b / statistics.median(times)
            rates[(decoder, b)] = rate
            report.emit(mode="engine", decoder=decoder, batch=b, num_beams=args.num_beams,
                        new_tokens=args.new_tokens, dtype=str(eng.dtype).replace("torch.", ""),
                        images_per_s=round(rate, 2),
                        batch_ms_p50=round(1000 * statistics.median(times), 1),
                        batch_ms_p95=round(1000 * pct(times, 0.95), 1),
                        peak_gib=peak_gib(eng.device), reps=args.reps)
        del eng, pixels  # one model in memory at a time
        release()
    for first, other in COMPARE:
        if first in args.decoders and other in args.decoders:
            for b in args.batch_sizes:
                if (first, b) in rates and (other, b) in rates:
                    report.emit(mode="engine", compare=f"{first}/{other}", batch=b,
                                ratio=round(rates[(first, b)] / rates[(other, b)], 2))
    if args.compare_naive:
        naive_eng = make_engine(args, BLIP_DECODER="hf", BLIP_MAX_BATCH_SIZE="1")
        n = min(args.naive_images, len(jpegs))
        t0 = time.perf_counter()
        for j in jpegs[:n]:  # the seed's loop: one image at a time, end to end
            px = naive_eng.preprocess(decode(j)).unsqueeze(0)
            naive_eng.generate_batch(px, [DEFAULT_PROMPT], params)
        sync(naive_eng.device)
        naive = n / (time.perf_counter() - t0)
        best = max(rates.values()) if rates else float("nan")
        report.emit(mode="engine", variant="naive (seed loop: one image at a time, hf)",
                    images_per_s=round(naive, 2), best_images_per_s=round(best, 2),
                    ratio=round(best / naive, 2))
        del naive_eng
        release()


def _batcher(args, eng):
    from batcher import Batcher
    return Batcher(eng, eng.cfg.batch_wait_ms).start()


def mode_job(args, report: Report) -> None:
    params = params_of(args)
    jpegs = synthetic_jpegs(min(args.images, 64), args.image_size)
    rates: dict[tuple[str, str], float] = {}
    for decoder in args.decoders:
        eng = make_variant(args, decoder)
        # without a GPU nothing is pinned: one run, labelled so
        for staging in args.staging if eng.device.type == "cuda" else ["none (no GPU)"]:
            # pinned: each image preprocessed into pinned memory and copied to the GPU on its
            # own (the worker's default on CUDA); host: the batch stacked and pinned on the
            # host by the GPU thread (how the worker staged batches before pinned staging)
            eng.device_collate = staging == "pinned" and eng.device.type == "cuda"
            pixels = [eng.preprocess(decode(jpegs[i % len(jpegs)])) for i in range(args.images)]
            b = _batcher(args, eng)
            try:
                for label in ("warm-up", "measured"):
                    reset_peak(eng.device)
                    t0 = time.perf_counter()
                    job = b.producer()  # as the worker does: the job may still send images
                    futures = [b.submit(px, DEFAULT_PROMPT, params) for px in pixels]
                    job.release()
                    results = [f.result() for f in futures]
                    elapsed = time.perf_counter() - t0
            finally:
                b.stop()
            assert all(r.error is None for r in results)
            rates[(decoder, staging)] = args.images / elapsed
            report.emit(mode="job", images=args.images, num_beams=args.num_beams,
                        new_tokens=args.new_tokens, decoder=decoder, staging=staging,
                        batch_limit=eng.batch_limit(params),
                        images_per_s=round(args.images / elapsed, 2), seconds=round(elapsed, 3),
                        peak_gib=peak_gib(eng.device),
                        batch_sizes=sorted(set(b.batch_sizes[-20:])), note=label)
            del pixels
            b.engine = None  # the stopped batcher must not keep the model alive
        del eng
        release()
    for (d1, s1), r1 in rates.items():
        for (d2, s2), r2 in rates.items():
            if ((d1, d2) in COMPARE and s1 == s2) or (d1 == d2 and (s1, s2) == ("pinned", "host")):
                report.emit(mode="job", compare=f"{d1}/{d2} {s1}/{s2}", ratio=round(r1 / r2, 3))


def mode_concurrent(args, report: Report) -> None:
    import jobs
    params = params_of(args)
    eng = make_engine(args)
    pixels = [eng.preprocess(decode(j)) for j in synthetic_jpegs(args.images, args.image_size)]
    b = _batcher(args, eng)
    try:
        b.submit(pixels[0], DEFAULT_PROMPT, params).result()  # warm-up
        latencies: list[float] = []
        arrivals: list[float] = []

        def one_job(px, job=None):
            job = job or b.producer()  # registered as the worker registers a running job
            t = time.perf_counter()
            future = b.submit(px, DEFAULT_PROMPT, params)
            arrivals.append(time.perf_counter())
            job.release()  # its only image is queued: nothing more will come from it
            future.result()
            latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        for px in pixels:
            one_job(px)
        sequential = time.perf_counter() - t0
        seq_lat = list(latencies)
        def gated(px):
            job = b.producer()  # the jobs are all running (fetching) before any submits
            gate.wait()
            one_job(px, job)

        # Round 1 meets batch shapes for the first time (CUDA graph capture); a worker that
        # has run a while has them: later rounds are closer to that steady state, unless they
        # split the jobs into batch sizes not met before. All are reported.
        for round_ in (1, 2, 3):
            latencies.clear()
            arrivals.clear()
            first_batch = len(b.batch_sizes)
            gate = threading.Barrier(len(pixels))
            with ThreadPoolExecutor(len(pixels)) as pool:
                t0 = time.perf_counter()
                list(pool.map(gated, pixels))
                together = time.perf_counter() - t0
            times = sorted(arrivals)  # when the jobs' images reached the GPU queue
            gaps = [y - x for x, y in zip(times, times[1:])] or [0.0]
            report.emit(mode="concurrent", round=round_, jobs=args.images,
                        num_beams=args.num_beams, new_tokens=args.new_tokens,
                        decoder=eng.cfg.decoder, images_per_s=round(args.images / together, 2),
                        sequential_images_per_s=round(args.images / sequential, 2),
                        ratio=round(sequential / together, 2),
                        one_image_p50_ms=round(1000 * statistics.median(seq_lat), 1),
                        one_image_p95_ms=round(1000 * pct(seq_lat, 0.95), 1),
                        concurrent_p50_ms=round(1000 * statistics.median(latencies), 1),
                        arrival_spread_ms=round(1000 * (times[-1] - times[0]), 1),
                        arrival_max_gap_ms=round(1000 * max(gaps), 1),
                        batch_sizes=b.batch_sizes[first_batch:],  # this round's, in order
                        # a deployed worker with these settings runs at most this many jobs
                        # at once (RunPod holds the rest): fewer than --images caps the batches
                        worker_jobs_at_once=jobs.concurrent_jobs(eng.cfg.max_concurrent_jobs,
                                                                 eng.max_batch_size))
    finally:
        b.stop()
        # free the model now: a later mode in the same process sizes batches from free memory
        b.engine = None
        del eng
        release()


def zip_data_uri(jpegs: list[bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, data in enumerate(jpegs):
            zf.writestr(f"images/{i:05d}.jpg", data)
    return "data:application/zip;base64," + base64.b64encode(buf.getvalue()).decode()


def mode_pipeline(args, report: Report) -> None:
    import inputs
    import jobs
    params = params_of(args)
    env = {**worker_env(), "BLIP_MODEL": args.model,
           "BLIP_MAX_BATCH_SIZE": str(max(args.batch_sizes))}
    cfg = config.Config.from_env(env)
    eng = engine_mod.load_engine(cfg, decode_options(args, cfg))
    worker = jobs.Worker(cfg, eng)
    jpegs = synthetic_jpegs(args.images, args.image_size)
    threads = cfg.decode_threads  # the worker's decode pool has this many threads
    job = {"data_url": zip_data_uri(jpegs), "num_beams": params.num_beams,
           "max_length": params.max_length, "min_length": params.min_length}
    try:
        worker.run(dict(job, data_url=zip_data_uri(jpegs[:8])))  # warm-up

        def pure(data):
            src = inputs.ImageSource((0, 0), "x", lambda d=data: io.BytesIO(d))
            return eng.preprocess(inputs.decode_image(src, cfg, eng.image_size))

        with ThreadPoolExecutor(threads) as pool:
            for _ in range(2):  # the second pass is timed (first-use allocations are done)
                pixels = None
                t0 = time.perf_counter()
                pixels = list(pool.map(pure, jpegs))
                pure_rate = len(jpegs) / (time.perf_counter() - t0)
        # captioning alone, the same images in the same batches, nothing else running; the
        # second pass is timed (batch shapes met before, as in the worker run below)
        for _ in range(2):
            t0 = time.perf_counter()
            eng.generate_with_fallback(pixels, [DEFAULT_PROMPT] * len(pixels), params,
                                       eng.batch_limit(params))
            sync(eng.device)
            caption_rate = len(jpegs) / (time.perf_counter() - t0)
        del pixels
        t0 = time.perf_counter()
        out = worker.run(job)
        elapsed = time.perf_counter() - t0
        assert "captions" in out and len(out["captions"]) == len(jpegs), str(out)[:300]
        rate = len(jpegs) / elapsed
        # The best ratio possible: with a GPU, captioning runs beside decoding (bound: the
        # slower of the two); on a CPU both need the same cores, so at best their times add.
        if eng.device.type == "cpu":
            bound = caption_rate / (pure_rate + caption_rate)
        else:
            bound = min(1.0, caption_rate / pure_rate)
        report.emit(mode="pipeline", images=len(jpegs), image_size="%dx%d" % args.image_size,
                    decode_threads=threads, num_beams=params.num_beams,
                    new_tokens=params.max_length, images_per_s=round(rate, 2),
                    pure_decode_preprocess_per_s=round(pure_rate, 2),
                    caption_only_per_s=round(caption_rate, 2),
                    ratio=round(rate / pure_rate, 3), best_possible_ratio=round(bound, 3),
                    of_best=round(rate / pure_rate / bound, 3), timings=out["timings"])
    finally:
        worker.close()
        worker.engine = worker.batcher.engine = None
        del eng, worker
        release()


def mode_api(args, report: Report) -> None:
    import socket
    import subprocess
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, BLIP_MODEL=args.model)
    proc = subprocess.Popen([sys.executable, os.path.join(SRC, "handler.py"), "--rp_serve_api",
                             "--rp_api_port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/runsync"
    params = params_of(args)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the API server did not start")
                time.sleep(0.3)
        jpegs = synthetic_jpegs(args.images, args.image_size)

        def post(data: bytes) -> float:
            body = json.dumps({"input": {
                "data_url": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
                "num_beams": params.num_beams, "max_length": params.max_length,
                "min_length": params.min_length}}).encode()
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as resp:
                answer = json.load(resp)
            assert answer.get("status") == "COMPLETED", str(answer)[:300]
            return time.perf_counter() - t

        post(jpegs[0])  # warm-up
        t0 = time.perf_counter()
        seq = [post(j) for j in jpegs]
        sequential = time.perf_counter() - t0
        # Round 1 meets the batch shapes for the first time; all rounds are reported.
        for round_ in (1, 2, 3):
            with ThreadPoolExecutor(len(jpegs)) as pool:
                t0 = time.perf_counter()
                conc = list(pool.map(post, jpegs))
                together = time.perf_counter() - t0
            report.emit(mode="api", round=round_, jobs=len(jpegs), num_beams=params.num_beams,
                        new_tokens=params.max_length, sequential_s=round(sequential, 3),
                        concurrent_s=round(together, 3), ratio=round(sequential / together, 2),
                        one_job_p50_ms=round(1000 * statistics.median(seq), 1),
                        concurrent_job_p50_ms=round(1000 * statistics.median(conc), 1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def mode_load(args, report: Report) -> None:
    t0 = time.perf_counter()
    import transformers.models.blip_2.modeling_blip_2  # noqa: F401
    imports = time.perf_counter() - t0
    for decoder in args.decoders:
        eng = make_variant(args, decoder)
        report.emit(mode="load", import_s=round(imports, 2), load_s=round(eng.load_s, 2),
                    warmup_s=round(eng.warmup_s, 3), decoder=decoder,
                    max_batch_size=eng.max_batch_size)
        imports = 0.0  # imported once
        eng.free_memory()
        del eng
        release()


MODES = {"engine": mode_engine, "job": mode_job, "concurrent": mode_concurrent,
         "pipeline": mode_pipeline, "api": mode_api, "load": mode_load}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("BLIP_MODEL", "tiny-random"),
                    help="tiny-random | random-full | a local directory or repo id "
                         "(default: BLIP_MODEL, else tiny-random)")
    ap.add_argument("--mode", default="engine", choices=sorted(MODES))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", default="640x480",
                    type=lambda s: tuple(int(v) for v in s.lower().split("x")))
    ap.add_argument("--batch-sizes", default="1,4,16,64",
                    type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--decoders", default="fast", type=lambda s: s.split(","),
                    help="engine variants (engine and job modes): " + ", ".join(VARIANTS))
    ap.add_argument("--staging", default="pinned", type=lambda s: s.split(","),
                    help="job mode: pinned (default) and/or host (see mode_job)")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="model dtype (default: the worker's, BLIP_DTYPE)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare-naive", action="store_true")
    ap.add_argument("--naive-images", type=int, default=16)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return ap.parse_args(argv)


def main(argv=None, decode: dict | None = None) -> int:
    """``decode``: changes to every engine's fast-decoder options (``generation.DecodeOptions``
    fields, e.g. ``{"cudnn_attention": "all"}``), for scripts that compare one switch; the api
    mode's worker process does not see them."""
    args = parse_args(argv)
    args.decode = dict(decode or {})
    device = engine_mod.resolve_device(os.environ.get("BLIP_DEVICE", "auto"))
    MODES[args.mode](args, Report(args, device, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
