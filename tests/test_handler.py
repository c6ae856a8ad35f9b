"""The runpod handler glue: async, never raises, and a cancelled job stops its work."""
import asyncio
import os
import time

import pytest

import config
import handler
from support import web
from support import images as pics
from support.worker import FAST


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    work = tmp_path_factory.mktemp("handler")
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0",
                                  "WORK_DIR": str(work), "DOWNLOAD_DEADLINE_S": "60"})
    w = handler.setup(cfg).worker
    yield w, work
    w.close()
    handler.service = None


def test_job_and_decode_threads_are_started_at_setup_not_on_the_first_burst(worker):
    w, _ = worker
    # (ThreadPoolExecutor keeps its started threads in ``_threads``)
    assert len(handler.service.executor._threads) == handler.service.max_jobs == 16  # auto on a CPU
    assert len(w.decode_pool._threads) == w.cfg.decode_threads
    assert all(t.is_alive() for t in handler.service.executor._threads | w.decode_pool._threads)


def test_handler_answers_a_job(worker):
    job = {"id": "h-1", "input": {"data_url": web.data_uri(pics.jpeg(seed=1),
                                                                "image/jpeg"), **FAST}}
    out = asyncio.run(handler.handler(job))
    assert out["captions"][0]["image_path"] == "data_url"


def test_a_cancelled_job_stops_its_downloads_and_frees_its_directory(worker, http_server):
    w, work = worker
    slow = http_server.route("/drip.jpg", web.drip(pics.jpeg(seed=2), interval=0.5))
    job = {"id": "h-cancel", "input": {"data_urls": [slow], **FAST}}

    async def run_then_cancel():
        task = asyncio.create_task(handler.handler(job))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_then_cancel())
    deadline = time.monotonic() + 15
    while (os.listdir(work) or w._jobs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not w._jobs and os.listdir(work) == []
    assert http_server.hits("/drip.jpg") == 1


def test_handler_without_a_worker_answers_an_error():
    saved, handler.service = handler.service, None
    try:
        assert "not initialised" in asyncio.run(handler.handler({"id": "x", "input": {}}))["error"]
    finally:
        handler.service = saved


def test_concurrency_modifier_reports_the_configured_jobs(worker):
    # MAX_CONCURRENT_JOBS' default (auto): the CPU batch limit 8, raised to the floor of 16
    assert worker[0].engine.max_batch_size == 8
    assert handler.concurrency_modifier(1) == 16
