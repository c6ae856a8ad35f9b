"""The worker as a process: ``python src/handler.py`` run once (``run_handler``) or serving
runpod's local API (``ApiServer``, its answers in ``Worker.run``'s shape by ``api_output``), the
environment it gets (``worker_env``), and its figures (``proc_figures``). ``FAST``: the generation
settings that keep a tiny-model job short.
"""
from __future__ import annotations

import socket
import time

from support.web import PRIVATE_ENV, PROXY_ENVS


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
HANDLER = REPO / "src" / "handler.py"

FAST = {"num_beams": 2, "max_length": 8, "min_length": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**overrides: str) -> dict[str, str]:
    """Environment for a worker process: tiny model (or TEST_ENGINE's engine), private URLs
    allowed for the local server, no proxies."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENVS}
    env.update({"BLIP_MODEL": "tiny-random", PRIVATE_ENV: "true", "PYTHONUNBUFFERED": "1",
                "BLIP_ENGINE": os.environ.get("TEST_ENGINE", "transformers")})
    env.update(overrides)
    return env


def run_handler(*args: str, timeout: float = 300, **env: str):
    """``python src/handler.py ARGS`` in the repo root, as a user runs it locally."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(HANDLER), *args], cwd=REPO, env=worker_env(**env),
                          capture_output=True, text=True, timeout=timeout)


class ApiServer:
    """``python src/handler.py --rp_serve_api`` in a subprocess: runpod's own local API."""

    def __init__(self, log_path, **env: str):
        self.port = free_port()
        self.env = worker_env(**env)
        self.log_path = log_path
        self.proc = None

    def start(self, timeout: float = 180) -> "ApiServer":
        import subprocess
        import sys
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HANDLER), "--rp_serve_api", "--rp_api_port", str(self.port)],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API server exited: {self.output()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the API server did not start: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()

    def post(self, path: str, payload: object = None, timeout: float = 300) -> dict:
        import json
        import urllib.request
        data = json.dumps(payload if payload is not None else {}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def runsync(self, job_input: dict, timeout: float = 300) -> dict:
        return self.post("/runsync", {"input": job_input}, timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        if self.proc:
            self.log.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def api_output(answer: dict) -> dict:
    """A /runsync answer in ``Worker.run``'s shape: the output, or {"error": ...}."""
    if answer.get("status") == "COMPLETED":
        return answer["output"]
    return {"error": answer.get("error", f"no error in the answer {answer!r}")}


def proc_figures(pid: int) -> dict[str, int]:
    """Resident memory (KiB), thread count and open file descriptors of a live process."""
    import os
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}
