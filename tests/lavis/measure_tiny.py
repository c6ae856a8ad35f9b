"""Tiny-model CPU throughput of one engine: load time and captions/s at batch 1 and 8, greedy and
beams 3, on the same pictures. Not a test (pytest does not collect it); run it once per venv:

    .venv/bin/python tests/lavis/measure_tiny.py
    BLIP_ENGINE=lavis .venv-lavis/bin/python tests/lavis/measure_tiny.py

Prints one JSON line per measurement: captions/s of the best and the median of REPEATS runs over
IMAGES pictures of 640x480 (preprocessing included, as ``engine.caption`` does it). Load times
exclude the one-off library imports; the lavis load is measured cold (tiny artifacts built into
an empty cache) and warm (read from it).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import torch  # noqa: E402

import engines  # noqa: E402
from config import Config  # noqa: E402
from params import GenerationParams  # noqa: E402
from support import images as pics  # noqa: E402

IMAGES = 16
REPEATS = 5
SETTINGS = {"greedy": GenerationParams(num_beams=1, max_length=20, min_length=5),
            "beams3": GenerationParams(num_beams=3, max_length=20, min_length=5)}


def load(env: dict[str, str]) -> engines.BaseEngine:
    """The engine without warm-up; its ``load_s`` excludes the one-off library imports."""
    return engines.load_engine(Config.from_env({**os.environ, **env, "BLIP_WARMUP": "false"}))


def measure(name: str, eng: engines.BaseEngine, loads: dict[str, float]) -> None:
    print(json.dumps({"engine": name, "threads": torch.get_num_threads(),
                      **{k: round(v, 3) for k, v in loads.items()}}))
    images = [pics.picture(seed, (640, 480)) for seed in range(IMAGES)]
    eng.caption(images[:2], SETTINGS["greedy"], batch_size=2)  # first-call costs
    for label, params in SETTINGS.items():
        for batch in (1, 8):
            runs = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                eng.caption(images, params, batch_size=batch)
                runs.append(time.perf_counter() - t0)
            print(json.dumps({"engine": name, "params": label, "batch": batch,
                              "captions_per_s": round(IMAGES / min(runs), 2),
                              "median_captions_per_s": round(IMAGES / statistics.median(runs), 2)}))


def main() -> None:
    base = {"BLIP_MODEL": "tiny-random", "BLIP_DEVICE": "cpu"}
    name = os.environ.get("BLIP_ENGINE", "transformers")
    if name != "lavis":
        eng = load(base)
        measure(name, eng, {"load_s": eng.load_s})
        return
    with tempfile.TemporaryDirectory() as cold:
        os.environ["XDG_CACHE_HOME"] = cold  # testing_models builds its artifacts there
        cold_s = load(base).load_s
        eng = load(base)
        measure(name, eng, {"load_cold_s": cold_s, "load_warm_s": eng.load_s})


if __name__ == "__main__":
    main()
