"""The benchmark (scripts/bench.py): every mode runs on the tiny model and prints the JSON lines that
OPTIMIZATION.md quotes. Only what the numbers are made of is checked here, never a speed."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402  (scripts/bench.py: a tool, not part of the worker)

SMALL = ["--model", "tiny-random", "--image-size", "96x64", "--new-tokens", "4"]


def run(capsys, *argv: str) -> list[dict]:
    assert bench.main([*SMALL, *argv]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows and all(r["model"] == "tiny-random" and r["device"].startswith("cpu")
                        and r["versions"]["torch"] for r in rows)
    return rows


def test_engine_mode_reports_each_batch_size_and_the_naive_ratio(capsys):
    rows = run(capsys, "--mode", "engine", "--batch-sizes", "1,3", "--decoders", "fast,hf",
               "--compare-naive", "--naive-images", "2", "--reps", "1")
    engine_rows = [r for r in rows if r.get("batch") is not None and "decoder" in r]
    assert {(r["decoder"], r["batch"]) for r in engine_rows} >= {
        ("fast", 1), ("fast", 3), ("hf", 1), ("hf", 3)}
    assert all(r["images_per_s"] > 0 for r in engine_rows)
    (naive,) = [r for r in rows if r.get("variant", "").startswith("naive")]
    assert naive["images_per_s"] > 0 and naive["ratio"] > 0


def test_concurrent_mode_batches_jobs_together_and_reports_worker_admission(capsys):
    rows = run(capsys, "--mode", "concurrent", "--images", "5")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert sum(r["batch_sizes"]) == 5 and r["ratio"] > 0
        assert r["worker_jobs_at_once"] == 16  # auto on a CPU: batch limit 8, floor 16


def test_job_and_load_modes(capsys):
    job = run(capsys, "--mode", "job", "--images", "6", "--staging", "host")
    assert job and all(r["images_per_s"] > 0 for r in job)
    load = run(capsys, "--mode", "load")
    assert load[0]["max_batch_size"] == 8 and load[0]["load_s"] >= 0


def test_pipeline_mode_captions_every_image_and_reports_its_bound(capsys):
    (row,) = run(capsys, "--mode", "pipeline", "--images", "12", "--batch-sizes", "4")
    assert row["images"] == 12 and 0 < row["ratio"]
    # on a CPU captioning and decoding share the cores: the bound is c / (d + c)
    d, c = row["pure_decode_preprocess_per_s"], row["caption_only_per_s"]
    assert row["best_possible_ratio"] == pytest.approx(c / (d + c), abs=0.002)


def test_api_mode_posts_to_the_real_local_api(capsys):
    rows = run(capsys, "--mode", "api", "--images", "3")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["jobs"] == 3 and r["sequential_s"] > 0 and r["concurrent_s"] > 0 for r in rows)


def test_cpu_pipeline_bound_script_runs():
    import subprocess
    import sys

    from support.worker import REPO
    out = subprocess.run([sys.executable, "scripts/cpu_pipeline_bound.py", "--images", "8",
                          "--rounds", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # the input floor is a part of captioning's work: a model costing only that is faster
    assert row["input_floor_per_s"] > row["caption_per_s"] > 0
    assert row["best_ratio_free_model"] > row["best_ratio_tiny_random"] > 0


def test_worker_settings_in_the_environment_apply_and_are_reported(capsys, monkeypatch):
    # (until this was fixed the bench ignored them: `BLIP_CUDA_GRAPHS=0` changed nothing)
    monkeypatch.setenv("BLIP_MAX_BATCH_SIZE", "3")
    rows = run(capsys, "--mode", "concurrent", "--images", "7")
    for r in rows:
        assert r["settings"] == {"BLIP_MAX_BATCH_SIZE": "3"}
        assert sum(r["batch_sizes"]) == 7 and max(r["batch_sizes"]) <= 3
