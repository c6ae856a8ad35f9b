"""End to end through runpod's own entry points: the local API (--rp_serve_api) in a
subprocess, `python src/handler.py` on test_input.json, and --test_input. Tiny model; the
engine is TEST_ENGINE (default transformers; the LAVIS suite runs these again with lavis)."""
import json
import os

import pytest

from support import web
from support import images as pics
from support.worker import FAST, REPO, ApiServer, run_handler, worker_env
from support.zips import five_member_zip


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    with ApiServer(work / "server.log", WORK_DIR=str(work / "jobs")) as server:
        yield server


def test_runsync_zip_gives_captions_errors_and_skipped(api, http_server):
    url = http_server.route("/five.zip", web.body(five_member_zip()))
    answer = api.runsync({"data_url": url, **FAST})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert len(out["captions"]) == 4 and len(out["errors"]) == 1 and out["skipped"] == 1
    assert out["errors"][0]["image_path"] == "c/broken.jpg"


def test_runsync_data_urls_with_a_404(api, http_server):
    good = [http_server.route(f"/ok{i}.png", web.body(pics.png(seed=i))) for i in range(2)]
    gone = http_server.route("/gone.png", web.status(404))
    out = api.runsync({"data_urls": [good[0], gone, good[1]], **FAST})["output"]
    assert [c["image_path"] for c in out["captions"]] == good
    assert out["errors"] == [{"image_path": gone, "error": (
        "the server answered HTTP 404 Not Found; check that the URL is correct and publicly "
        "readable (no login, not expired)")}]


def test_invalid_params_fail_readably(api):
    answer = api.runsync({"data_url": "https://example.com/a.jpg", "num_beams": 0,
                          "tempreature": 1})
    assert answer["status"] == "FAILED"
    assert "num_beams" in answer["error"] and "temperature" in answer["error"]


def test_run_then_status_completes(api):
    job = api.post("/run", {"input": {"data_url": web.data_uri(pics.jpeg(seed=3),
                                                                     "image/jpeg"), **FAST}})
    assert job["status"] == "IN_PROGRESS"
    # runpod 1.12's local API runs a /run job when its /status is polled
    done = api.post(f"/status/{job['id']}")
    assert done["status"] == "COMPLETED" and len(done["output"]["captions"]) == 1


def test_the_work_directory_is_clean_after_jobs(api):
    api.runsync({"data_url": web.data_uri(five_member_zip(), "application/zip"), **FAST})
    assert os.listdir(api.env["WORK_DIR"]) == []


def test_injected_oom_through_the_api_returns_every_caption(tmp_path, api):
    uris = [web.data_uri(pics.jpeg(seed=40 + i), "image/jpeg") for i in range(5)]
    clean = api.runsync({"data_urls": uris, **FAST})["output"]["captions"]
    with ApiServer(tmp_path / "oom.log", BLIP_INJECT_OOM_ABOVE_BATCH="1") as chaos:
        answer = chaos.runsync({"data_urls": uris, **FAST})
        assert "out-of-memory" in chaos.output() or "out of memory" in chaos.output()
    assert answer["status"] == "COMPLETED" and answer["output"]["captions"] == clean


def test_handler_runs_test_input_json():
    done = run_handler()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "completed successfully" in done.stdout
    doc = json.loads((REPO / "test_input.json").read_text())
    assert doc["input"]["data_url"].startswith("data:")  # self-contained: runs offline
    assert doc["input"]["data_url"][30:200] not in done.stdout  # never log the base64


def test_handler_runs_a_test_input_argument():
    job = {"input": {"data_url": web.data_uri(pics.png(seed=5), "image/png"), **FAST}}
    done = run_handler("--test_input", json.dumps(job))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "'captions': [{'image_path': 'data_url'" in done.stdout


def test_a_failing_test_input_exits_non_zero():
    done = run_handler("--test_input", json.dumps({"input": {"num_beams": 3}}))
    assert done.returncode != 0 and "data_url" in done.stdout


def test_bad_configuration_exits_before_taking_jobs():
    done = run_handler(BLIP_MAX_BATCH_SIZE="lots", BLIP_DTYPE="float8")
    assert done.returncode == 2
    assert "BLIP_MAX_BATCH_SIZE" in done.stderr and "BLIP_DTYPE" in done.stderr
    assert "Started" not in done.stdout


def test_missing_weights_exit_with_directions(tmp_path):
    if worker_env()["BLIP_ENGINE"] == "lavis":  # LAVIS's real model, empty caches
        env = dict(BLIP_MODEL="caption_coco_opt2.7b", TORCH_HOME=str(tmp_path / "torch"),
                   HF_HOME=str(tmp_path / "hf"))
    else:
        env = dict(BLIP_MODEL=str(tmp_path / "no-model"))
    done = run_handler(HF_HUB_OFFLINE="1", **env)
    assert done.returncode == 1
    assert "builder/fetch_model.py" in done.stderr and "BLIP_MODEL=tiny-random" in done.stderr
