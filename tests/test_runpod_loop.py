"""The worker's production path: ``python src/handler.py`` with RunPod's webhook variables set,
taking jobs from the local RunPod simulator (tests/support/runpod_sim.py) through runpod's own
worker loop (job-take-batch long polls, progress and job-done posts, job-stop, SIGTERM), and
clients talking to the simulator through runpod's own ``Endpoint``. Tiny model on the CPU.

One worker serves the whole module (MAX_CONCURRENT_JOBS=4, BLIP_MAX_BATCH_SIZE=2, the
POISON chaos prompt armed); the SIGTERM tests come last because they stop it.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from typing import Callable

import pytest
import runpod

from support import web
from support import images as pics
from support.runpod_sim import RunPodSim, WorkerProcess
from support.worker import FAST, REPO
from support.zips import make_zip

CONCURRENT = 4
BATCH = 2
POISON = "POISON"
# 0.1-0.3 s per batch of 2 on these CPUs: a job of a few batches is observable while it runs
SLOW = {"num_beams": 3, "max_length": 30, "min_length": 30}
# about 0.35 s per batch: far longer than a cancel takes to reach the worker (tens of ms)
SLOWER = {"num_beams": 5, "max_length": 60, "min_length": 60}
GRACE = 0.1  # seconds a progress post may be on its way when the worker hears of a cancel
PROGRESS = re.compile(r"captioned (\d+)/(\d+) images|captioned (\d+) images? so far")


@pytest.fixture(scope="module")
def sim():
    with RunPodSim() as s:
        yield s


@pytest.fixture(scope="module")
def shared_worker(sim, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with WorkerProcess(sim, "w-loop", REPO, log_path=log,
                       MAX_CONCURRENT_JOBS=str(CONCURRENT), BLIP_MAX_BATCH_SIZE=str(BATCH),
                       BLIP_INJECT_CUDA_ERROR_PROMPT=POISON) as w:
        w.start().wait_ready()
        yield w


@pytest.fixture
def worker(shared_worker):
    assert shared_worker.alive(), f"the module's worker is gone:\n{shared_worker.log()[-3000:]}"
    return shared_worker


@pytest.fixture(scope="module")
def ep(sim):
    """runpod's sync client pointed at the simulator (it copies the base URL when built)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runpod, "endpoint_url_base", sim.base_url)
        return runpod.Endpoint(sim.endpoint_id, api_key=sim.api_key)


def status(ep: runpod.Endpoint, job_id: str) -> dict:
    return ep.rp_client.get(f"{ep.endpoint_id}/status/{job_id}")


def uri(seed: int) -> str:
    return web.data_uri(pics.jpeg(seed), "image/jpeg")


def counts(text: str) -> tuple[int, int | None]:
    """(captioned, total or None) of a progress text; AssertionError if it is not one."""
    m = PROGRESS.fullmatch(str(text))
    assert m, f"not a progress text: {text!r}"
    return (int(m[1]), int(m[2])) if m[1] else (int(m[3]), None)


def finished(*ids: str) -> Callable[[RunPodSim], bool]:
    def all_final(s: RunPodSim) -> bool:
        return all(s.job(i).final for i in ids)
    return all_final


def gate_route(release: threading.Event, data: bytes):
    """A route that answers only once ``release`` is set (30 s at most)."""
    def serve(h) -> None:
        release.wait(30)
        web.body(data, "image/jpeg")(h)
    return serve


# --- tests ---------------------------------------------------------------------------------------

def test_several_jobs_in_progress_at_once_from_one_take_batch(sim, worker, ep, http_server):
    # each job: two inline images and one behind a 2 s delay, so all four are in flight together
    sim.pause_takes()
    ids = []
    for k in range(CONCURRENT):
        slow = http_server.route(f"/slow/{k}.jpg",
                                 web.delay(2.0, web.body(pics.jpeg(k), "image/jpeg")))
        ids.append(ep.run({"data_urls": [uri(10 + k), uri(20 + k), slow], **FAST}).job_id)
    sim.pause_takes(False)
    sim.wait_for(finished(*ids), timeout=60)
    carried = [t for t in sim.takes(worker.worker_id) if set(t.job_ids) & set(ids)]
    assert [(t.kind, t.batch_size, t.job_ids) for t in carried] == [
        ("take_batch", CONCURRENT, tuple(ids))], "one take-batch should carry all four jobs"
    jobs = [sim.job(i) for i in ids]
    for job in jobs:
        assert job.status == "COMPLETED", sim.summary()
        assert len(job.output["captions"]) == 3 and "errors" not in job.output
        assert all(p.kind != "done" for p in job.posts_after_final), job.posts_after_final
    assert max(j.taken_at for j in jobs) < min(j.finished_at for j in jobs), \
        "the four jobs were not in progress at the same time"
    beats = [set(p.job_ids) for p in sim.pings(worker.worker_id)]
    assert any(set(ids) <= b for b in beats), \
        f"no heartbeat listed all four jobs in progress: {beats[-8:]}"


def test_progress_updates_show_in_status_while_in_progress(sim, worker, ep):
    images = 10  # five batches of BATCH
    job_id = ep.run({"data_urls": [uri(30 + i) for i in range(images)], **SLOW}).job_id
    seen: list[tuple[str, object]] = []
    deadline = time.monotonic() + 60
    while not sim.job(job_id).final and time.monotonic() < deadline:
        state = status(ep, job_id)
        seen.append((state["status"], state.get("output")))
        time.sleep(0.03)
    job = sim.job(job_id)
    assert job.status == "COMPLETED" and len(job.output["captions"]) == images, sim.summary()
    texts = [u.output for u in job.progress]
    parsed = [counts(t) for t in texts]
    assert len(texts) >= 2, f"a job of {images} images in batches of {BATCH}: {texts}"
    assert all(total in (None, images) for _, total in parsed), texts
    assert any(total == images for _, total in parsed), f"no 'captioned k/{images}': {texts}"
    # not checked: their order (runpod posts each from its own new thread, so two can swap)
    assert all(0 < k <= images for k, _ in parsed), texts
    during = [out for st, out in seen if st == "IN_PROGRESS" and out is not None]
    assert during, f"/status never showed a progress update while IN_PROGRESS: {seen}"
    assert set(during) <= set(texts), (during, texts)
    assert status(ep, job_id)["output"] == job.output  # the result replaces the progress


def test_cancel_stops_the_job_and_its_progress(sim, worker, ep, http_server):
    """A client cancels a running job: job-stop tells the worker, which drops the job (no
    job-done) and posts no progress for it afterwards. Issue 14 item 4: the worker still
    posted e.g. 'captioned 4/60 images' for a 61-image job (the batch on the GPU finished, and
    the total counted only the images queued before the cancel)."""
    members = 60
    real_images = members + 1  # the zip's members and one image behind a gate
    data = make_zip([(f"d/{i:02d}.jpg", pics.jpeg(i)) for i in range(members)])
    release = threading.Event()
    try:
        zip_url = http_server.route("/cancel/sixty.zip", web.body(data, "application/zip"))
        gate = http_server.route("/cancel/gate.jpg", gate_route(release, pics.jpeg(99)))
        job = ep.run({"data_urls": [zip_url, gate], **SLOWER})
        # cancel right after an update: the next batch ends ~0.35 s later, long after the
        # worker has the cancel, so an update posted after it is the worker's, not a race
        deadline = time.monotonic() + 60
        while not sim.job(job.job_id).progress:
            assert time.monotonic() < deadline, sim.summary()
            time.sleep(0.01)
        assert job.cancel()["status"] == "CANCELLED"
        cancelled = sim.job(job.job_id).cancelled_at
        # the worker drops the job's queued images: it ends in well under the ~10 s that its
        # other 58 images would take
        stopped = f"job {job.job_id} failed: the job was cancelled"
        deadline = time.monotonic() + 8
        while stopped not in worker.log():
            assert time.monotonic() < deadline, f"no {stopped!r} in:\n{worker.log()[-3000:]}"
            time.sleep(0.1)
        time.sleep(1.0)  # any progress post already on its way lands
    finally:
        release.set()
    final = sim.job(job.job_id)
    assert final.status == "CANCELLED" and final.stop_sent_at is not None, sim.summary()
    assert final.done_posts == 0 and all(p.kind != "done" for p in final.posts_after_final), \
        f"a job-done was posted for the cancelled job: {final.posts_after_final}"
    # The worker hears of the cancel when job-stop answers (stop_sent_at): up to a second
    # after the cancel, as runpod sleeps 1 s after each empty job-stop poll (rp_scale.py
    # monitor_stop_signals). Updates before that are fair, and one arriving within GRACE of it
    # may have left the worker before it knew (each is posted from its own thread); later
    # ones are the bug, and so is any whose total is not the job's image count.
    heard = final.stop_sent_at + GRACE
    updates = [(u.at, u.output) for u in final.progress] + [
        (p.at, p.body.get("output")) for p in final.posts_after_final if p.kind == "progress"]
    problems = [f"{out!r} posted {at - final.stop_sent_at:+.3f} s after job-stop reached the "
                f"worker" for at, out in updates if at > heard]
    problems += [f"{out!r} counts {counts(out)[1]} images; the job has {real_images}"
                 for _, out in updates if counts(out)[1] not in (None, real_images)]
    timeline = "\n".join(f"  {at - cancelled:+.3f} s  {out!r}" for at, out in sorted(updates))
    assert not problems, (
        "\n".join(problems) + f"\nprogress updates, seconds from the cancel (job-stop reached "
        f"the worker at {final.stop_sent_at - cancelled:+.3f} s):\n{timeline}")


def test_refresh_worker_reaches_runpod_as_stop_pod(sim, worker, ep):
    job_id = ep.run({"data_url": uri(5), "prompt": POISON, "num_beams": 1}).job_id
    sim.wait_for(finished(job_id), timeout=60)
    job = sim.job(job_id)
    assert job.status == "FAILED" and job.stop_pod is True, sim.summary()
    assert job.error.startswith("the GPU failed while captioning (") and "injected" in job.error
    assert "worker will be replaced" in job.error
    answer = status(ep, job_id)
    assert answer["status"] == "FAILED" and answer["error"] == job.error
    # runpod itself only stops a worker for config["refresh_worker"]; stopPod asks RunPod's
    # platform to, so the process is still up until the platform (not simulated) acts
    assert worker.alive()


# --- SIGTERM (stops the module's worker: keep these last) ------------------------------------

@pytest.fixture(scope="module")
def terminated(sim, shared_worker, ep):
    """SIGTERM the worker with two slow jobs in flight and a take-batch open; then queue one
    more job while that take is still held. {name: value} of what happened."""
    w = shared_worker
    assert w.alive()
    with web.LocalServer() as server:
        slow = [server.route(f"/term/{k}.jpg", web.delay(2.0, web.body(
            pics.jpeg(50 + k), "image/jpeg"))) for k in range(2)]
        early = [ep.run({"data_urls": [uri(60 + k), url], **FAST}).job_id
                 for k, url in enumerate(slow)]
        sim.wait_for(lambda s: all(s.job(i).status == "IN_PROGRESS" for i in early), 30)
        mark = time.monotonic()  # wait for a take opened now, so it stays held ~take_wait_s
        sim.wait_for(lambda s: any(t > mark for t in s.open_takes(w.worker_id)), 10)
        held = max(sim.open_takes(w.worker_id))
        sigterm = time.monotonic()
        w.terminate()
        time.sleep(0.3)  # the signal is handled: runpod's job loop has stopped taking jobs
        still_held = held in sim.open_takes(w.worker_id)
        late = ep.run({"data_url": uri(70), **FAST}).job_id
        try:
            code = w.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        exited = time.monotonic()
    return {"early": early, "late": late, "sigterm": sigterm, "exited": exited, "code": code,
            "held": held, "still_held": still_held, "log": w.log()}


def test_sigterm_answers_the_jobs_in_flight_and_exits(sim, terminated):
    t = terminated
    assert t["code"] == 0, f"exit code {t['code']}:\n{t['log'][-3000:]}"
    early = [sim.job(i) for i in t["early"]]
    for job in early:
        assert job.status == "COMPLETED" and len(job.output["captions"]) == 2, sim.summary()
        assert job.finished_at > t["sigterm"], "the job was not in flight at SIGTERM"
    exit_s = t["exited"] - t["sigterm"]
    after_last = t["exited"] - max(j.finished_at for j in early)
    # the open job-stop / job-take long polls (take_wait_s each) are what it waits for last
    assert exit_s < 10 and after_last < sim.take_wait_s + 3, \
        f"exited {exit_s:.1f} s after SIGTERM, {after_last:.1f} s after its last result"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "runpod 1.12 (rp_scale.py JobScaler): after SIGTERM run_jobs stops once its queue is "
    "empty, but a job-take request already open still hands out a job, which get_jobs queues "
    "and nobody runs: it stays IN_PROGRESS on RunPod until its timeout"))
def test_sigterm_job_handed_out_by_an_open_take_is_answered(sim, terminated):
    t = terminated
    late = sim.job(t["late"])
    if not t["still_held"] or late.worker_id is None:  # not an xfail: the scenario failed
        raise RuntimeError(f"the take open at SIGTERM was not holding when the late job came "
                           f"({late.status}, worker {late.worker_id})")
    started = f'"requestId": "{late.id}", "message": "Started."' in t["log"]
    assert late.final, (f"job {late.id} was handed to {late.worker_id} "
                        f"{late.taken_at - t['sigterm']:.2f} s after SIGTERM (by the take open "
                        f"since {t['held'] - t['sigterm']:+.2f} s), "
                        f"{'started' if started else 'queued, never started'}, never answered: "
                        f"{late.status}")
