"""The RunPod simulator itself (tests/support/runpod_sim.py), without a worker: its endpoint API
through runpod's own sync client, its worker side through plain HTTP in the shapes runpod's
worker loop uses (test_runpod_loop.py drives it with the real worker). Fast: no model."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import runpod

from support.runpod_sim import RunPodSim


@pytest.fixture
def sim():
    with RunPodSim(take_wait_s=0.3) as s:
        yield s


def endpoint(sim: RunPodSim, api_key: str | None = None) -> runpod.Endpoint:
    """runpod's sync client pointed at the simulator (it reads the base URL at construction)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runpod, "endpoint_url_base", sim.base_url)
        return runpod.Endpoint(sim.endpoint_id, api_key=api_key or sim.api_key)


class Worker:
    """The worker side over plain HTTP, as runpod 1.12's worker loop sends it."""

    def __init__(self, sim: RunPodSim, worker_id: str = "w1"):
        env = sim.worker_env(worker_id)
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", worker_id)
        self.done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", worker_id)
        self.headers = {"Authorization": env["RUNPOD_AI_API_KEY"]}

    def take(self, n: int = 1) -> requests.Response:
        url = self.take_url
        if n > 1:
            url = url.replace("/job-take/", "/job-take-batch/") + f"&batch_size={n}"
        return requests.get(url + "&job_in_progress=0", headers=self.headers, timeout=10)

    def post(self, job_id: str, result: dict) -> requests.Response:
        return requests.post(self.done_url.replace("$ID", job_id) + "&isStream=false",
                             data=json.dumps(result), timeout=10,
                             headers={**self.headers,
                                      "Content-Type": "application/x-www-form-urlencoded"})

    def stops(self) -> requests.Response:
        return requests.get(self.take_url.replace("/job-take/", "/job-stop/"),
                            headers=self.headers, timeout=10)


def test_a_job_round_trip_through_runpods_client(sim):
    ep, w = endpoint(sim), Worker(sim)
    job = ep.run({"data_url": "x"})
    assert job.status() == "IN_QUEUE"
    taken = w.take()
    assert taken.status_code == 200 and taken.json() == {"id": job.job_id,
                                                          "input": {"data_url": "x"}}
    assert w.post(job.job_id, {"status": "IN_PROGRESS", "output": "half"}).ok
    state = ep.rp_client.get(f"{sim.endpoint_id}/status/{job.job_id}")
    assert (state["status"], state["output"]) == ("IN_PROGRESS", "half")
    assert w.post(job.job_id, {"output": {"captions": []}}).ok
    assert job.output(timeout=5) == {"captions": []}
    recorded = sim.job(job.job_id)
    assert recorded.status == "COMPLETED" and recorded.worker_id == "w1"
    assert [u.output for u in recorded.progress] == ["half"]
    assert recorded.taken_at <= recorded.progress[0].at <= recorded.finished_at
    assert sim.counts["run"] == 1 and sim.counts["take"] == 1 and sim.counts["done"] == 1


def test_take_shapes_long_poll_and_batch(sim):
    w = Worker(sim)
    start = time.monotonic()
    assert w.take(4).status_code == 204 and time.monotonic() - start >= 0.25  # held, then none
    ids = [endpoint(sim).run({"n": i}).job_id for i in range(3)]
    batch = w.take(2)
    assert [j["id"] for j in batch.json()] == ids[:2]  # a list, FIFO, at most batch_size
    # a held take answers as soon as a job arrives
    threading.Timer(0.1, lambda: endpoint(sim).run({"n": 9})).start()
    assert w.take().json()["id"] == ids[2]
    assert w.take().json()["input"] == {"n": 9}
    assert [t.kind for t in sim.takes()] == ["take_batch", "take_batch", "take", "take"]


def test_pause_takes_lets_one_batch_carry_every_queued_job(sim):
    w = Worker(sim)
    sim.pause_takes()
    ids = [endpoint(sim).run({"n": i}).job_id for i in range(3)]
    assert w.take(4).status_code == 204
    sim.pause_takes(False)
    assert [j["id"] for j in w.take(4).json()] == ids


def test_cancel_reaches_the_worker_through_job_stop_and_late_posts_are_kept(sim):
    ep, w = endpoint(sim), Worker(sim)
    queued, running = ep.run({"n": 1}), ep.run({"n": 2})
    assert w.take().json()["id"] == queued.job_id
    assert queued.cancel()["status"] == "CANCELLED"  # taken: the worker must hear of it
    assert w.stops().json() == {"jobsToStop": [queued.job_id]}
    assert w.stops().status_code == 204
    assert running.cancel()["status"] == "CANCELLED"  # still queued: never handed out
    assert w.take().status_code == 204
    w.post(queued.job_id, {"status": "IN_PROGRESS", "output": "late"})
    w.post(queued.job_id, {"error": "the job was cancelled"})
    job = sim.job(queued.job_id)
    assert job.status == "CANCELLED" and job.progress == [] and job.done_posts == 0
    assert [(p.kind, p.body) for p in job.posts_after_final] == [
        ("progress", {"status": "IN_PROGRESS", "output": "late"}),
        ("done", {"error": "the job was cancelled"})]
    assert job.cancelled_at <= job.stop_sent_at


def test_errors_stop_pod_and_auth(sim):
    ep, w = endpoint(sim), Worker(sim)
    job = ep.run({"n": 1})
    w.take()
    w.post(job.job_id, {"error": "GPU gone", "stopPod": True})
    done = sim.job(job.job_id)
    assert (done.status, done.error, done.stop_pod) == ("FAILED", "GPU gone", True)
    with pytest.raises(RuntimeError, match="401"):
        endpoint(sim, api_key="wrong").run({"n": 1})
    bad = requests.get(w.take_url + "&job_in_progress=0", timeout=5,
                       headers={"Authorization": f"Bearer {sim.worker_key}"})
    assert bad.status_code == 401  # the worker side wants the raw key
    assert sim.counts["401"] == 2


def test_body_limit_answers_413():
    with RunPodSim(max_body_bytes=1000) as sim:
        answer = requests.post(f"{sim.base_url}/{sim.endpoint_id}/run",
                               json={"input": {"data_url": "x" * 2000}}, timeout=10,
                               headers={"Authorization": f"Bearer {sim.api_key}"})
        assert answer.status_code == 413 and "too large" in answer.json()["error"]
        assert sim.jobs() == []


def test_results_expire_after_retention():
    with RunPodSim(retention_s=0.3, take_wait_s=0.1) as sim:
        ep, w = endpoint(sim), Worker(sim)
        a, b = ep.run({"n": 1}).job_id, ep.run({"n": 2}).job_id
        w.take(2)
        for job_id in (a, b):
            w.post(job_id, {"output": "ok"})
        status = f"{sim.base_url}/{sim.endpoint_id}/status/"
        auth = {"Authorization": f"Bearer {sim.api_key}"}
        sim.expire(a)
        gone = requests.get(status + a, headers=auth, timeout=5)
        assert gone.status_code == 404 and a in gone.json()["error"]
        assert requests.get(status + b, headers=auth, timeout=5).json()["output"] == "ok"
        time.sleep(0.4)
        assert requests.get(status + b, headers=auth, timeout=5).status_code == 404


def test_throttle_and_429_storms(sim):
    url, auth = f"{sim.base_url}/{sim.endpoint_id}", {"Authorization": f"Bearer {sim.api_key}"}
    sim.throttle(2, retry_after=1)
    codes = [requests.post(url + "/run", json={"input": {}}, headers=auth, timeout=5)
             for _ in range(3)]
    assert [c.status_code for c in codes] == [429, 429, 200]
    assert codes[0].headers["Retry-After"] == "1"
    assert len(sim.jobs()) == 1
    # runpod's sync client retries 429s (urllib3 Retry, honouring Retry-After) for GETs only:
    # urllib3 does not retry a POST by default, so /run's 429 reaches the caller
    ep = endpoint(sim)
    sim.throttle(1, retry_after=0, calls=("run",))
    with pytest.raises(requests.HTTPError, match="429"):
        ep.run({"n": 1})
    job_id = sim.jobs()[0].id
    sim.throttle(1, retry_after=0, calls=("status",))
    assert ep.rp_client.get(f"{sim.endpoint_id}/status/{job_id}")["status"] == "IN_QUEUE"
    sim.throttle_rate(0.5, retry_after=None, calls=("status",), seed=3)
    got = [requests.get(f"{url}/status/{job_id}", headers=auth, timeout=5) for _ in range(40)]
    limited = sum(r.status_code == 429 for r in got)
    assert 8 <= limited <= 32 and all("Retry-After" not in r.headers for r in got)
    sim.throttle_rate(0)
    assert requests.get(f"{url}/status/{job_id}", headers=auth, timeout=5).ok
    assert sim.counts["429"] == 4 + limited == sim.counts["429:run"] + sim.counts["429:status"]


def test_runsync_waits_for_the_result(sim):
    w = Worker(sim)

    def work() -> None:
        job = w.take().json()
        w.post(job["id"], {"output": {"echo": job["input"]}})
    threading.Thread(target=work).start()
    assert endpoint(sim).run_sync({"n": 5}, timeout=10) == {"echo": {"n": 5}}
    assert sim.jobs()[0].sync


def test_health_counts_jobs_and_workers(sim):
    ep, w = endpoint(sim), Worker(sim)
    ep.run({"n": 1})
    ep.run({"n": 2})
    w.take()
    health = ep.health()
    assert health["jobs"]["inQueue"] == 1 and health["jobs"]["inProgress"] == 1
    assert health["workers"] == {"idle": 0, "running": 1}


def test_wait_for_explains_a_timeout(sim):
    endpoint(sim).run({"n": 1})
    with pytest.raises(AssertionError, match=r"(?s)not within 0.2 s.*IN_QUEUE.*run"):
        sim.wait_for(lambda s: s.jobs()[0].final, timeout=0.2)
