"""Load, soak and faults on the real local API (``src/handler.py --rp_serve_api``, tiny model):
``make soak``, a few minutes on two cores; ``SOAK_SCALE=0.25 make soak`` shortens it.

- 8 clients x 200 jobs of mixed shapes (``support.load.LoadMix``: one image to 50-image zips, bad
  members, 404s, bad files, jobs whose every download fails, one a slow drip): every job is
  answered exactly as it must be, every caption equals its image's caption alone, every bad
  image is a named error; memory, threads, descriptors and the work directory come back.
- The same mix (an eighth as many jobs, plus 8 poisoned ones) on a server that runs out of
  memory on every batch over 2 images and simulates a corrupted CUDA context for the poisoned
  jobs: still every caption; the poisoned jobs fail asking for a new worker, the others finish.
- Jobs whose downloads all fail beside ordinary jobs: the ordinary ones are not slowed.

Baseline for memory: the server's RSS after a warm-up round of the same mix (an eighth of the
soak, the same 8 clients), when the model, thread pools, malloc arenas and caches have reached
their working size. The soak runs in two halves and RSS is read after each. The bound: after
the soak RSS is within RSS_SLACK_MIB (64) of the baseline and the second half adds at most half
of that. Measured on 2 cores at full scale, two runs: 495 MiB after warm-up, then 505 and 510,
and 512 and 513 after the halves (+10 to +17, then +1 to +5: allocator fragmentation across 8+
threads' arenas, settling). A leak of what a job handles grows with each half and is far
larger: keeping each decoded 364x364 image (0.4 MB) adds about 260 MiB per 1,100 images (seen,
with such a leak put in on purpose: 563 -> 823 -> 1089 MiB at SOAK_SCALE=0.1).
Threads and open descriptors must come back to within 2 of the baseline.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import pytest

from support import load
from support.worker import FAST, ApiServer, api_output, proc_figures

pytestmark = pytest.mark.soak

SCALE = float(os.environ.get("SOAK_SCALE", "1"))
CLIENTS = 8
JOBS = max(CLIENTS * 5, round(CLIENTS * 200 * SCALE))  # 1600 at full scale
DEADLINE_S = 3
POISON = "poison the gpu"
SERVER_ENV = {"DOWNLOAD_DEADLINE_S": str(DEADLINE_S), "DOWNLOAD_RETRY_BACKOFF_S": "0.05",
              "MAX_CONCURRENT_JOBS": "4"}
RSS_SLACK_MIB = 64


def runner(api: ApiServer):
    return lambda job_input: api_output(api.runsync(job_input))


class Sampler:
    """Reads the server's figures every ``every`` seconds while a load runs (peaks)."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.peak = pid, every, {"rss_kib": 0, "threads": 0, "fds": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            now = proc_figures(self.pid)
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[soak] {text}")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    work = tmp_path_factory.mktemp("soak")
    with ApiServer(work / "server.log", **SERVER_ENV, WORK_DIR=str(work / "jobs")) as server:
        yield server


@pytest.fixture(scope="module")
def captions(api):
    return load.pool_captions(runner(api), FAST)


def test_soak_every_job_answered_every_image_captioned_nothing_leaks(api, captions, http_server,
                                                                     capsys):
    run, pid, work = runner(api), api.proc.pid, api.env["WORK_DIR"]
    mix = load.LoadMix(http_server, FAST, seed=1, prefix="soak", drip=True)
    warm = load.run_load(run, mix.jobs(JOBS // 8), CLIENTS)
    assert load.load_problems(warm, captions) == []
    base = proc_figures(pid)
    halves, figures, started = [], [], time.monotonic()
    with Sampler(pid) as sampler:
        for _ in range(2):
            jobs = mix.jobs(JOBS // 2)
            halves.append(load.run_load(run, jobs, CLIENTS))
            figures.append(proc_figures(pid))
    duration = time.monotonic() - started
    results = halves[0] + halves[1]
    problems = load.load_problems(results, captions)
    images = sum(job.images for job, _, _ in results)
    bad = sum(len(out.get("errors", [])) for _, out, _ in results)
    failed = sum("error" in out for _, out, _ in results)
    mib = [round(f["rss_kib"] / 1024) for f in (base, *figures)]
    report(capsys, f"{len(results)} jobs ({failed} failed as they must), {images} images "
                   f"captioned, {bad} named image errors in {duration:.0f} s with {CLIENTS} "
                   f"clients; RSS MiB after warm-up {mib[0]}, after each half {mib[1:]}, peak "
                   f"{sampler.peak['rss_kib'] // 1024}; threads {base['threads']} -> "
                   f"{figures[-1]['threads']}, fds {base['fds']} -> {figures[-1]['fds']}")
    assert problems == [], problems[:20]
    assert len(results) == JOBS // 2 * 2 and images > JOBS * 4
    assert os.listdir(work) == []  # no job directory left behind
    assert mib[2] - mib[0] <= RSS_SLACK_MIB and mib[2] - mib[1] <= RSS_SLACK_MIB // 2, mib
    assert figures[-1]["threads"] <= base["threads"] + 2, (base, figures)
    assert figures[-1]["fds"] <= base["fds"] + 2, (base, figures)


def test_failing_jobs_do_not_slow_the_jobs_beside_them(api, captions, http_server, capsys):
    """3 clients send small jobs alone, then while a 4th sends, back to back, jobs whose every
    download fails (404s and a drip cut at the 3 s deadline). MAX_CONCURRENT_JOBS is 4, so the
    failing jobs hold a slot but never a neighbour's. Bound: identical answers, no neighbour
    half the deadline slower than alone, median latency at most doubled plus 0.25 s."""
    run = runner(api)
    mix = load.LoadMix(http_server, FAST, seed=2, prefix="beside", drip=True)
    jobs = mix.jobs(max(15, JOBS // 20), kinds=("url", "inline", "list", "zip"))
    alone, beside, failed = load.load_beside_failures(run, mix, jobs, clients=3, failing_clients=1)
    before = statistics.median(s for _, _, s in alone)
    after = statistics.median(s for _, _, s in beside)
    slowest = max(s for _, _, s in beside)
    report(capsys, f"{len(jobs)} jobs beside {len(failed)} failing ones: median latency "
                   f"{before:.2f} s alone, {after:.2f} s beside; slowest {slowest:.2f} s")
    assert load.load_problems(alone + beside + failed, captions) == []
    assert failed  # each lasts the deadline: they ran while the jobs beside them did
    assert load.slowed(alone, beside, by=DEADLINE_S / 2) == []
    assert after <= 2 * before + 0.25, (before, after)


def test_injected_oom_and_a_corrupted_gpu_during_load(tmp_path, http_server, capsys):
    env = {**SERVER_ENV, "BLIP_INJECT_OOM_ABOVE_BATCH": "2",
           "BLIP_INJECT_CUDA_ERROR_PROMPT": POISON}
    with ApiServer(tmp_path / "chaos.log", **env, WORK_DIR=str(tmp_path / "jobs")) as chaos:
        run = runner(chaos)
        captions = load.pool_captions(run, FAST)  # alone: batches of one never run out of memory
        mix = load.LoadMix(http_server, FAST, seed=3, prefix="chaos", poison=POISON)
        jobs = mix.jobs(max(CLIENTS * 5, JOBS // 8)) + mix.jobs(CLIENTS, kinds=("poison",))
        mix.rng.shuffle(jobs)
        started = time.monotonic()
        results = load.run_load(run, jobs, CLIENTS)
        duration = time.monotonic() - started
        log = chaos.output()
        assert os.listdir(chaos.env["WORK_DIR"]) == []
    poisoned = sum(job.fails == load.GPU_FAILED for job in jobs)
    report(capsys, f"chaos: {len(jobs)} jobs ({poisoned} poisoned), "
                   f"{sum(j.images for j in jobs)} images in {duration:.0f} s; "
                   f"{log.count('out of memory at batch')} out-of-memory retries")
    assert load.load_problems(results, captions) == []
    # after one, the reduced batch is kept until the queue drains: few, but during the load
    assert log.count("out of memory at batch") >= 1
    assert log.count("GPU failure, asking RunPod to replace this worker") == poisoned
