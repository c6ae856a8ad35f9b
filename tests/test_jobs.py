"""Whole jobs through jobs.Worker (validate -> fetch -> decode -> caption -> output) on the tiny
model, against the real local HTTP server and real zips/images."""
import json
import os
import threading
import time

import pytest

import config
import engines as engine_mod
import jobs
from support import web
from support import images as pics
from support.engine import record_batches
from support.worker import FAST
from support.zips import five_member_zip, make_zip, many_members_zip, zip_bomb


def make_worker(tmp_path, **env):
    settings = {"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0", "WORK_DIR": str(tmp_path / "work"),
                "DOWNLOAD_DEADLINE_S": "5", "DOWNLOAD_RETRY_BACKOFF_S": "0.01", **env}
    cfg = config.Config.from_env(settings)
    return jobs.Worker(cfg, engine_mod.load_engine(cfg))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = make_worker(tmp_path_factory.mktemp("jobs"))
    yield w
    w.close()


def test_zip_with_nested_folder_corrupt_member_and_text_file(worker, http_server):
    url = http_server.route("/five.zip", web.body(five_member_zip()))
    out = worker.run({"data_url": url, **FAST}, "job-zip")
    assert [c["image_path"] for c in out["captions"]] == [
        "a/deeper/third.webp", "a/first.jpg", "b/second.png", "z/fourth.gif"]
    assert all(c["caption"] for c in out["captions"])
    assert len({c["caption"] for c in out["captions"]}) == 4
    assert [e["image_path"] for e in out["errors"]] == ["c/broken.jpg"]
    assert out["skipped"] == 1
    assert out["model"] == "tiny-random" and out["engine"] == "transformers"
    assert set(out["timings"]) == {"fetch_s", "caption_s", "total_s"}


def test_timings_measure_the_fetch_the_captioning_and_the_whole_job(worker, http_server):
    late = http_server.route("/late.jpg", web.delay(1.0, web.body(pics.jpeg(seed=320))))
    ready = [web.data_uri(pics.jpeg(seed=321 + i), "image/jpeg") for i in range(2)]
    started = time.monotonic()
    out = worker.run({"data_urls": [*ready, late], "batch_size": 1, **FAST})
    wall = time.monotonic() - started
    t = out["timings"]
    assert len(out["captions"]) == 3 and set(t) == {"fetch_s", "caption_s", "total_s"}
    # the last source arrived after its server's 1 s delay; the whole job took longer (the
    # timings are rounded to the millisecond)
    assert 1.0 <= t["fetch_s"] < t["total_s"] <= wall + 0.0005
    # captioning began with the inline images, before the late one arrived, and ended with
    # it: the stages overlap
    assert 0.9 <= t["caption_s"] < t["total_s"]
    assert t["fetch_s"] + t["caption_s"] > t["total_s"]


def test_one_404_among_data_urls_costs_only_that_image(worker, http_server):
    urls = [http_server.route(f"/img{i}.jpg", web.body(pics.jpeg(seed=10 + i)))
            for i in range(3)]
    urls.insert(1, http_server.route("/missing.jpg", web.status(404)))
    out = worker.run({"data_urls": urls, **FAST}, "job-404")
    assert [c["image_path"] for c in out["captions"]] == [urls[0], urls[2], urls[3]]
    assert out["errors"][0]["image_path"] == urls[1] and "HTTP 404" in out["errors"][0]["error"]
    assert "skipped" not in out


def test_captions_follow_input_order_and_match_captioning_alone(worker):
    imgs = [pics.jpeg(seed=s) for s in range(20, 26)]
    uris = [web.data_uri(b, "image/jpeg") for b in imgs]
    together = worker.run({"data_urls": uris, **FAST})["captions"]
    alone = [worker.run({"data_url": u, **FAST})["captions"][0]["caption"] for u in uris]
    assert [c["caption"] for c in together] == alone
    assert [c["image_path"] for c in together] == [f"data_urls[{i}]" for i in range(6)]


def test_invalid_params_fail_with_one_readable_message(worker):
    out = worker.run({"data_url": "https://example.com/x.jpg", "num_beam": 3, "max_length": "50"})
    assert set(out) == {"error"}
    assert "num_beam" in out["error"] and "num_beams" in out["error"]
    assert "max_length" in out["error"]


def test_nothing_captioned_fails_and_lists_the_reasons(worker, http_server):
    urls = [http_server.route(f"/gone{i}.jpg", web.status(404)) for i in range(2)]
    out = worker.run({"data_urls": urls, **FAST})
    assert set(out) == {"error"}
    assert "no image could be captioned" in out["error"] and out["error"].count("HTTP 404") == 2


def test_zip_without_images_fails_clearly(worker):
    uri = web.data_uri(make_zip([("a.txt", b"x"), ("b.csv", b"1,2")]),
                       "application/zip")
    out = worker.run({"data_url": uri})
    assert "no images found" in out["error"] and "2 non-image files were skipped" in out["error"]


def test_num_captions_gives_alternatives(worker):
    uri = web.data_uri(pics.jpeg(seed=7), "image/jpeg")
    out = worker.run({"data_url": uri, "num_beams": 4, "num_captions": 3, "max_length": 8})
    entry = out["captions"][0]
    assert isinstance(entry["caption"], str) and len(entry["alternatives"]) == 2
    assert entry["caption"] not in entry["alternatives"]


def test_include_prompt(worker):
    uri = web.data_uri(pics.jpeg(seed=8), "image/jpeg")
    bare = worker.run({"data_url": uri, **FAST})["captions"][0]["caption"]
    full = worker.run({"data_url": uri, "include_prompt": True, **FAST})["captions"][0]["caption"]
    assert full == f"a photo of {bare}"


def test_job_directory_is_removed_after_success_and_failure(tmp_path, http_server):
    w = make_worker(tmp_path)
    try:
        w.run({"data_url": web.data_uri(pics.jpeg(seed=1), "image/jpeg"), **FAST})
        w.run({"data_url": http_server.route("/bad.zip", web.body(zip_bomb()))})
        w.run({"data_url": web.data_uri(five_member_zip(), "application/zip"), **FAST})
        assert os.listdir(tmp_path / "work") == []
    finally:
        w.close()


def test_zip_over_its_limits_fails_the_job_naming_the_env_var(worker):
    uri = web.data_uri(many_members_zip(1001, pics.jpeg(seed=1)), "application/zip")
    out = worker.run({"data_url": uri})
    assert "MAX_IMAGES_PER_JOB" in out["error"]


def test_concurrent_jobs_each_get_their_own_captions(worker):
    jobs_in = [[web.data_uri(pics.jpeg(seed=100 + 10 * j + i), "image/jpeg")
                for i in range(3)] for j in range(6)]
    alone = [[c["caption"] for c in worker.run({"data_urls": u, **FAST})["captions"]]
             for u in jobs_in]
    results = [None] * len(jobs_in)
    gate = threading.Barrier(len(jobs_in))

    def run(j):
        gate.wait()
        results[j] = worker.run({"data_urls": jobs_in[j], **FAST}, f"job-{j}")

    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(jobs_in))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [[c["caption"] for c in r["captions"]] for r in results] == alone


def test_injected_oom_still_captions_every_image(tmp_path, worker, monkeypatch):
    uris = [web.data_uri(pics.jpeg(seed=200 + i), "image/jpeg") for i in range(6)]
    clean = worker.run({"data_urls": uris, **FAST})
    chaos = make_worker(tmp_path, BLIP_INJECT_OOM_ABOVE_BATCH="1")
    chaos.batcher.wait_s = 600.0  # the job's 6 images ride in one batch (it ends the wait)
    tried = record_batches(monkeypatch, chaos.engine)
    try:
        assert chaos.run({"data_urls": uris, **FAST})["captions"] == clean["captions"]
        assert chaos.batcher.batch_sizes == [6]
        assert tried == [6, 3, 1, 1, 1, 1, 1, 1]  # halved until it fits, never lost an image
    finally:
        chaos.close()


def test_corrupted_gpu_asks_runpod_for_a_new_worker(tmp_path, monkeypatch):
    w = make_worker(tmp_path)
    try:
        def broken(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(w.engine, "_generate", broken)
        out = w.run({"data_url": web.data_uri(pics.jpeg(seed=1), "image/jpeg")})
        assert out["refresh_worker"] is True and "GPU failed" in out["error"]
    finally:
        w.close()


def test_progress_is_reported_for_jobs_over_one_batch(worker):
    seen = []
    uris = [web.data_uri(pics.jpeg(seed=300 + i), "image/jpeg") for i in range(5)]
    worker.run({"data_urls": uris, "batch_size": 2, **FAST}, progress=lambda d, t: seen.append(d))
    assert seen and seen[-1] == 5 and seen == sorted(seen)


def test_no_progress_for_a_job_of_one_batch_or_less(worker):
    seen = []
    uris = [web.data_uri(pics.jpeg(seed=310 + i), "image/jpeg") for i in range(2)]
    for job in ({"data_urls": uris, "batch_size": 2}, {"data_urls": uris},  # 2 = its batch
                {"data_url": uris[0]}):  # 1 and 2 images under the worker's batch of 8
        out = worker.run({**job, **FAST}, progress=lambda done, total: seen.append(done))
        assert "errors" not in out and len(out["captions"]) == len(job.get("data_urls", "1"))
    assert seen == []


def test_output_never_echoes_inline_data(worker):
    blob = web.data_uri(pics.jpeg(seed=9, size=(400, 300)), "image/jpeg")
    for job in ({"data_url": blob, **FAST}, {"data_url": blob, "num_beams": "x"},
                {"data_urls": [blob, "ftp://x"], **FAST}):
        text = json.dumps(worker.run(job))
        assert blob[40:120] not in text and len(text) < 2000


def test_non_dict_input_is_a_readable_error(worker):
    for bad in (None, [], "data_url", 42):
        out = worker.run(bad)
        assert set(out) == {"error"} and out["error"]


def test_injected_cuda_error_fails_only_the_job_that_hit_it(tmp_path):
    w = make_worker(tmp_path, BLIP_INJECT_CUDA_ERROR_PROMPT="corrupt the gpu")
    try:
        uri = web.data_uri(pics.jpeg(seed=400), "image/jpeg")
        bad = w.run({"data_url": uri, "prompt": "corrupt the gpu", **FAST})
        good = w.run({"data_url": uri, **FAST})
        assert bad["refresh_worker"] is True and "injected" in bad["error"]
        assert good["captions"] and "error" not in good
    finally:
        w.close()


def test_cancel_stops_a_job_waiting_on_a_slow_download(tmp_path, http_server):
    w = make_worker(tmp_path, DOWNLOAD_DEADLINE_S="60")
    try:
        slow = http_server.route("/slow.jpg", web.drip(pics.jpeg(seed=1), interval=0.5))
        fast = web.data_uri(pics.jpeg(seed=2), "image/jpeg")
        result = {}
        t = threading.Thread(target=lambda: result.update(
            w.run({"data_urls": [fast, slow], **FAST}, "job-cancel")))
        t.start()
        time.sleep(1.5)
        w.cancel("job-cancel")
        t.join(timeout=20)
        assert not t.is_alive(), "cancel must end the job promptly"
        assert result == {"error": "the job was cancelled"}
        assert os.listdir(tmp_path / "work") == []
        assert w.run({"data_url": fast, **FAST})["captions"]  # the worker goes on
    finally:
        w.close()


def test_downloaded_files_are_freed_once_decoded(tmp_path, http_server, monkeypatch):
    w = make_worker(tmp_path)
    seen = []
    import inputs
    real = inputs.decode_image

    def spy(src, cfg, min_side=364):
        image = real(src, cfg, min_side)
        seen.append(sorted(os.listdir(next((tmp_path / "work").iterdir()))))
        return image

    monkeypatch.setattr(jobs, "decode_image", spy)
    try:
        urls = [http_server.route(f"/f{i}.png", web.body(pics.png(seed=i))) for i in range(3)]
        out = w.run({"data_urls": urls, "batch_size": 1, **FAST})
        assert len(out["captions"]) == 3
        assert all(len(files) <= 3 for files in seen)
        # each decode saw its own file still there; afterwards every file was removed
        assert os.listdir(tmp_path / "work") == []
    finally:
        w.close()


def test_a_training_set_zip_with_caption_side_files_is_not_over_the_image_limit(tmp_path):
    w = make_worker(tmp_path, MAX_IMAGES_PER_JOB="3")
    try:
        entries = []
        for i in range(3):
            entries += [(f"set/{i}.jpg", pics.jpeg(seed=500 + i)), (f"set/{i}.txt", b"old")]
        out = w.run({"data_url": web.data_uri(make_zip(entries), "application/zip"),
                     **FAST})
        assert len(out["captions"]) == 3 and out["skipped"] == 3
    finally:
        w.close()


def test_a_job_releases_the_gpu_loop_once_its_last_image_is_queued(tmp_path):
    # a 10-minute batch wait: the job finishes only because it tells the GPU loop that no
    # more images will come once every member is decoded and queued; all ride in one batch
    w = make_worker(tmp_path)
    w.batcher.wait_s = 600.0  # beyond BLIP_BATCH_WAIT_MS's bounds: a hang would be obvious
    try:
        data = make_zip([(f"m{i}.png", pics.png(seed=i)) for i in range(5)])
        out = w.run({"data_url": web.data_uri(data), **FAST}, "job-release")
        assert len(out["captions"]) == 5 and "errors" not in out
        assert w.batcher.batch_sizes == [5]
        single = w.run({"data_url": web.data_uri(pics.jpeg(seed=9)), **FAST}, "job-one")
        assert len(single["captions"]) == 1 and w.batcher.batch_sizes == [5, 1]
    finally:
        w.close()


@pytest.mark.parametrize("setting, batch, expected", [
    (0, 8, 16),     # CPU default batch: the floor keeps the next jobs downloading
    (0, 40, 40),    # as many one-image jobs as one batch holds
    (0, 256, 64),   # H100 auto batch: capped (disk held by concurrent zip jobs)
    (5, 256, 5),    # MAX_CONCURRENT_JOBS set: used as is
    (100, 8, 100),
])
def test_concurrent_jobs_follow_the_batch_limit_unless_set(setting, batch, expected):
    assert jobs.concurrent_jobs(setting, batch) == expected


def test_auto_concurrency_lets_one_batch_hold_a_burst_of_one_image_jobs():
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_MAX_BATCH_SIZE": "48"})
    assert cfg.max_concurrent_jobs == 0  # the default is auto
    assert jobs.concurrent_jobs(cfg.max_concurrent_jobs, 48) == 48


def test_no_progress_after_a_cancel_and_a_total_only_once_known(tmp_path, http_server,
                                                                  monkeypatch):
    """As seen on RunPod: a job cancelled while a batch was on the GPU posted one more update,
    with a total that counted only the images queued before the cancel."""
    w = make_worker(tmp_path, DOWNLOAD_DEADLINE_S="60")
    real = w.engine.generate_with_fallback

    def slow_batches(*args, **kwargs):  # the real model, each batch held on the "GPU" longer
        time.sleep(0.4)
        return real(*args, **kwargs)

    monkeypatch.setattr(w.engine, "generate_with_fallback", slow_batches)
    reports: list[tuple[float, int, int | None]] = []
    try:
        ready = [web.data_uri(pics.jpeg(seed=700 + i), "image/jpeg") for i in range(8)]
        slow = [http_server.route(f"/late{i}.jpg", web.drip(pics.jpeg(seed=720 + i),
                                                                 interval=0.5))
                for i in range(4)]
        sources = ready + slow  # the job is still reading its inputs when it is cancelled
        result = {}
        t = threading.Thread(target=lambda: result.update(w.run(
            {"data_urls": sources, "batch_size": 1, **FAST}, "job-late",
            lambda done, total: reports.append((time.monotonic(), done, total)))))
        t.start()
        deadline = time.monotonic() + 30
        while not reports and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reports, "the job never reported progress"
        time.sleep(0.1)  # the next batch is on the GPU now
        w.cancel("job-late")
        cancelled_at = time.monotonic()
        t.join(timeout=20)
        assert not t.is_alive() and result == {"error": "the job was cancelled"}
        time.sleep(0.6)  # a batch in flight at the cancel has finished by now
        late = [r for r in reports if r[0] > cancelled_at]
        assert late == [], f"progress posted after the cancel: {late}"
        assert {total for _, _, total in reports} <= {None, len(sources)}, reports
    finally:
        w.close()
