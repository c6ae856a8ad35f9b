"""Progress updates through the real handler path: runpod's local API in a subprocess with
RUNPOD_WEBHOOK_POST_OUTPUT pointed at a real local HTTP server that records what runpod's
``progress_update`` posts (runpod reads that variable at import, hence the subprocess). Then the
same endpoint answering 500, hanging, and gone: a job never fails or waits for its progress."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from support import web
from support import images as pics
from support.worker import FAST, ApiServer

IMAGES = 6
BATCH = 2  # the job's batch_size: 3 batches or more, so the job is over one batch


class _Recorder(BaseHTTPRequestHandler):
    """Records each POST; answers as ``server.mode`` says ("ok", "fail" or "hang")."""
    protocol_version = "HTTP/1.0"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.posts.append({"path": parts.path, "query": parse_qs(parts.query),
                                      "type": self.headers.get("Content-Type"), "body": body})
        if self.server.mode == "hang":
            time.sleep(30)
        code = 500 if self.server.mode == "fail" else 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class ProgressEndpoint(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.lock = threading.Lock()
        self.posts: list[dict] = []
        self.mode = "ok"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def take(self, until) -> list[dict]:
        """Wait until ``until(posts)`` holds (progress is posted from background threads)."""
        def seen() -> list[dict]:
            with self.lock:
                return list(self.posts)

        deadline = time.monotonic() + 15
        while not until(posts := seen()):
            assert time.monotonic() < deadline, f"progress posts seen: {posts!r:.2000}"
            time.sleep(0.05)
        with self.lock:
            self.posts.clear()
        return posts


@pytest.fixture(scope="module")
def endpoint():
    server = ProgressEndpoint()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def api(endpoint, tmp_path_factory):
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/progress?id=$ID"
    with ApiServer(tmp_path_factory.mktemp("progress") / "api.log",
                   RUNPOD_WEBHOOK_POST_OUTPUT=url) as server:
        yield server


def run_job(api) -> dict:
    uris = [web.data_uri(pics.jpeg(seed=500 + i), "image/jpeg") for i in range(IMAGES)]
    started = time.monotonic()
    answer = api.post("/runsync", {"input": {"data_urls": uris, "batch_size": BATCH, **FAST}},
                      timeout=60)
    answer["seconds"] = time.monotonic() - started
    assert answer["status"] == "COMPLETED", answer
    assert len(answer["output"]["captions"]) == IMAGES and "errors" not in answer["output"]
    return answer


def progress_texts(posts: list[dict]) -> list[str]:
    return [json.loads(p["body"])["output"] for p in posts]


def test_progress_is_posted_after_each_batch(api, endpoint):
    endpoint.mode = "ok"
    answer = run_job(api)
    posts = endpoint.take(lambda ps: f"captioned {IMAGES}/{IMAGES} images" in progress_texts(ps)
                          or f"captioned {IMAGES} images so far" in progress_texts(ps))
    assert len(posts) >= IMAGES // BATCH
    for post in posts:
        assert post["path"] == "/progress" and post["type"] == "application/x-www-form-urlencoded"
        assert post["query"] == {"id": [answer["id"]], "isStream": ["false"]}
        assert json.loads(post["body"])["status"] == "IN_PROGRESS"
    texts = sorted(progress_texts(posts), key=lambda t: int(re.findall(r"\d+", t)[0]))
    counts = [int(re.findall(r"\d+", t)[0]) for t in texts]
    assert counts[-1] == IMAGES and len(set(counts)) == len(counts)  # each batch once
    for text in texts:
        assert re.fullmatch(rf"captioned \d+/{IMAGES} images|captioned \d+ images? so far",
                            text), text
    # a total only once every input was seen (data: URIs: before the last batch finishes),
    # and then in every later update
    with_total = [text.endswith(f"/{IMAGES} images") for text in texts]
    assert with_total == sorted(with_total), texts
    assert texts[-1] == f"captioned {IMAGES}/{IMAGES} images", texts


def test_a_failing_progress_endpoint_is_never_fatal(api, endpoint):
    endpoint.mode = "fail"
    run_job(api)
    endpoint.take(lambda ps: len(ps) >= IMAGES // BATCH)  # runpod tried, got 500s, went on


def test_a_hanging_progress_endpoint_does_not_slow_the_job(api, endpoint):
    endpoint.mode = "hang"
    answer = run_job(api)
    endpoint.take(lambda ps: len(ps) >= 1)
    assert answer["seconds"] < 20  # each post waits 30 s in its own thread


def test_a_vanished_progress_endpoint_is_never_fatal(api, endpoint):
    endpoint.shutdown()
    endpoint.server_close()
    run_job(api)
