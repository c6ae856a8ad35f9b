"""Benchmark of the dataset client (src/caption_dataset.py): JSON lines on stdout.

    python scripts/bench_fleet.py                     # everything (~5 min on 2 cores)
    python scripts/bench_fleet.py --skip-fleet        # the client's preparing stage only

Rows (``mode``):
- ``prepare``: the client's inline stage in-process, no endpoint: for synthetic camera-like
  JPEGs (``support.images.photo``, quality 95) of 640x480 and 4000x3000, the bytes per image raw
  against pre-resized (the worker's decode + ``preprocess.resize`` to 364 px + lossless WebP),
  the pre-resize rate on ``--threads`` threads (images/s, wall) and its CPU ms per image, and
  ``prepare_file`` as shipped (it sends the smaller of raw and pre-resized): CPU ms and bytes
  sent per image.
- ``fleet``: end to end through the RunPod simulator (tests/support/runpod_sim.py) with 1 and
  then 2 real workers (``python src/handler.py``, tiny-random on CPU, float32), the client run
  as the user runs it (a subprocess, ``--stats``): images/s from the first job built to the
  summary, the client's own CPU per image over that span (``time.process_time`` of the client
  process: building jobs, encoding, /run and /status calls, writing the output; its start-up
  and imports are reported apart as ``client_cpu_total_s``), and bytes sent per image. Sources:
  a URL list served by a local HTTP server, a folder of small images sent inline as they are,
  and folders of 640x480 and 4000x3000 JPEGs with and without pre-resizing.

Every worker and the client share this machine's cores, so the end-to-end rates measure the
tiny CPU model and the machine, not RunPod; the client's CPU per image is the number that
carries over.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import config  # noqa: E402
from dataset_client import packing, work  # noqa: E402
from support import web  # noqa: E402
from support import images as pics  # noqa: E402
from support.runpod_sim import RunPodSim, WorkerProcess  # noqa: E402

CAPTION = ["--num-beams", "1", "--max-length", "5"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"


class Report:
    def __init__(self) -> None:
        self.common = {"bench": "fleet", "commit": commit(), "cpus": os.cpu_count(),
                       "python": platform.python_version(),
                       "date": datetime.date.today().isoformat()}

    def emit(self, **fields) -> None:
        print(json.dumps({**fields, **self.common}), flush=True)


def jpegs(size: tuple[int, int], count: int, distinct: int = 4) -> list[bytes]:
    made = [pics.encode(pics.photo(size, seed=s), "JPEG", quality=95)
            for s in range(min(count, distinct))]
    return [made[i % len(made)] for i in range(count)]


def bench_prepare(report: Report, threads: int, tmp: Path) -> None:
    cfg = config.Config.from_env({})
    envelope = packing.envelope_bytes({})
    import preprocess  # noqa: F401 - torch imported before timing, as the client does
    for size, count in (((640, 480), 200), ((4000, 3000), 24)):
        files = jpegs(size, count)
        folder = tmp / f"prep-{size[0]}"
        folder.mkdir()
        items = []
        for i, data in enumerate(files):
            path = folder / f"{i:04d}.jpg"
            path.write_bytes(data)
            items.append(work.Item(path.name, path.name, "file", str(path)))
        packing.preresize_bytes(files[0], "warm", 364, cfg)
        cpu, wall = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            small = list(pool.map(lambda d: packing.preresize_bytes(d, "x", 364, cfg), files))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        raw_b = sum(map(len, files)) / count
        pre_b = sum(map(len, small)) / count
        cpu2 = time.process_time()
        prepared = [packing.prepare_file(it, True, 364, cfg, envelope, packing.MAX_BODY_BYTES)
                    for it in items]
        cpu2 = time.process_time() - cpu2
        report.emit(mode="prepare", image_size="%dx%d" % size, images=count, threads=threads,
                    raw_bytes_per_image=round(raw_b), preresized_bytes_per_image=round(pre_b),
                    raw_over_preresized=round(raw_b / pre_b, 2),
                    preresize_images_per_s=round(count / wall, 1),
                    preresize_cpu_ms_per_image=round(1000 * cpu / count, 2),
                    shipped_cpu_ms_per_image=round(1000 * cpu2 / count, 2),
                    shipped_sent_bytes_per_image=round(sum(p.data_bytes for p in prepared)
                                                       / count),
                    shipped_preresized=sum(p.preresized for p in prepared))


def run_client(sim: RunPodSim, sources: list[str], out: Path, *flags: str) -> dict:
    stats = out.with_suffix(".stats.json")
    env = {k: v for k, v in os.environ.items() if k not in web.PROXY_ENVS}
    env.update(sim.client_env())
    done = subprocess.run([sys.executable, str(REPO / "src" / "caption_dataset.py"), *sources,
                           "--endpoint", sim.endpoint_id, "--out", str(out), "--quiet",
                           "--stats", str(stats), *CAPTION, *flags],
                          capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"client exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(stats.read_text())


def emit_fleet(report: Report, workers: int, source: str, stats: dict, **extra) -> None:
    n = stats["captioned"] + stats["failed"]
    report.emit(mode="fleet", workers=workers, source=source, images=n, jobs=stats["jobs"],
                images_per_s=round(stats["images_per_s"], 1),
                client_cpu_ms_per_image=round(1000 * stats["loop_cpu_s"] / n, 3),
                client_cpu_total_s=round(stats["client_cpu_s"], 2),
                sent_bytes_per_image=round(stats["body_bytes"] / n),
                raw_bytes_per_image=round(stats["raw_bytes"] / n) if stats["raw_bytes"] else None,
                preresized=stats["preresized"], failed=stats["failed"], **extra)


def bench_fleet(report: Report, args: argparse.Namespace, tmp: Path) -> None:
    with web.LocalServer() as server, RunPodSim() as sim:
        urls = [server.route(f"/u/{i}.jpg", web.body(pics.jpeg(seed=i), "image/jpeg"))
                for i in range(args.images)]
        url_list = tmp / "urls.txt"
        url_list.write_text("\n".join(urls) + "\n")
        small = tmp / "small"
        for i in range(args.images):
            (small / f"{i // 100}").mkdir(parents=True, exist_ok=True)
            (small / f"{i // 100}" / f"{i:05d}.jpg").write_bytes(pics.jpeg(seed=i))
        folders = {}
        for size, count in (((640, 480), args.inline_images), ((4000, 3000), 24)):
            folder = folders[size] = tmp / f"jpeg-{size[0]}"
            folder.mkdir()
            for i, data in enumerate(jpegs(size, count)):
                (folder / f"{i:04d}.jpg").write_bytes(data)
        per_job = ["--images-per-job", str(args.images_per_job)]
        procs = []
        try:
            for n in (1, 2):
                w = WorkerProcess(sim, f"w{n}", REPO, tmp / f"w{n}.log", BLIP_DTYPE="float32")
                procs.append(w)
                w.start().wait_ready()
                emit_fleet(report, n, "url list", run_client(
                    sim, [str(url_list)], tmp / f"url-{n}.jsonl", *per_job),
                    images_per_job=args.images_per_job)
            emit_fleet(report, 2, "folder, small JPEGs inline (64x48, sent as they are)",
                       run_client(sim, [str(small)], tmp / "small.jsonl", *per_job),
                       images_per_job=args.images_per_job)
            for size, folder in folders.items():
                for mode in ("--no-preresize", "--preresize"):
                    label = f"folder, {size[0]}x{size[1]} JPEGs inline, {mode.strip('-')}"
                    emit_fleet(report, 2, label, run_client(
                        sim, [str(folder)], tmp / f"{size[0]}{mode}.jsonl", *per_job, mode),
                        images_per_job=args.images_per_job)
        finally:
            for w in procs:
                w.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512, help="URL-list and small-file images")
    p.add_argument("--inline-images", type=int, default=96, help="640x480 JPEGs inline")
    p.add_argument("--images-per-job", type=int, default=64,
                   help="jobs of this size (the default 256 would leave 2 jobs for 2 workers)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-fleet", action="store_true")
    args = p.parse_args()
    report = Report()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        bench_prepare(report, args.threads, tmp)
        if not args.skip_fleet:
            bench_fleet(report, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
