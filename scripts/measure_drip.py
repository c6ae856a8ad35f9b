"""How long a job waits on a server that sends 1 byte a second, through runpod's local API.

    python scripts/measure_drip.py        # the worker's default download settings; one JSON line

Serves an endless drip (1 byte/s) on 127.0.0.1, starts `python src/handler.py --rp_serve_api`
with the tiny model (the tests' own local server and API process, tests/support/) and posts one
`data_urls` job to /runsync. Before the low-speed cutoff the job waited for DOWNLOAD_DEADLINE_S
(300 s); with it, each attempt is cut after DOWNLOAD_LOW_SPEED_TIME_S and retried
DOWNLOAD_RETRIES times. DOWNLOAD_* settings in the environment pass through to the worker.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import web  # noqa: E402
from support.worker import ApiServer  # noqa: E402


def main() -> int:
    with web.LocalServer() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.route("/drip.jpg", web.drip(b"\xff\xd8\xff" + bytes(100_000), interval=1.0))
        with ApiServer(Path(tmp) / "api.log", BLIP_WARMUP="0") as api:
            started = time.monotonic()
            answer = api.runsync({"data_urls": [url]}, timeout=900)
            print(json.dumps({"seconds": round(time.monotonic() - started, 1),
                              "attempts": server.hits("/drip.jpg"), "answer": answer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
