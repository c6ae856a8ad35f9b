"""The dataset client (src/caption_dataset.py).

Pure logic first (body sizes measured on the real JSON, torn output files, the outcome table,
labels, URL lists, pre-resized pixels), then the client against the RunPod simulator
(tests/support/runpod_sim.py) with two real workers (``python src/handler.py``, tiny-random,
float32) started once for the module: the real runpod SDK on both sides, nothing mocked. The
client runs in-process (``caption_dataset.main``) where that is enough and as a subprocess for
SIGKILL, Ctrl-C and exit codes. The worker-kill scenario runs last: it kills one of the two.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import caption_dataset as cd
import config
import engines
import jobs
import output as worker_output
from dataset_client import fanout, outcomes, outfiles, packing, sources, work
from dataset_client.cli import _NoBar
from dataset_client.endpoint import retry_after
from inputs import ImageSource, decode_image
from support import web
from support import images as pics
from support.runpod_sim import RunPodSim, WorkerProcess
from support.s3 import moto_bucket
from support.worker import REPO, free_port
from support.zips import make_zip

CLIENT = REPO / "src" / "caption_dataset.py"
FAST = ["--num-beams", "1", "--max-length", "5", "--poll-interval", "0.2", "--quiet"]
SENSITIVE = ["--num-beams", "3", "--num-captions", "3", "--max-length", "20",
             "--poll-interval", "0.2", "--quiet"]


# --- helpers ---------------------------------------------------------------------------------

def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keys_of(recs: list[dict]) -> list[tuple[str, str]]:
    return [(r["source"], r["image_path"]) for r in recs]


def assert_exactly_once(recs: list[dict], expected: set[tuple[str, str]]) -> None:
    keys = keys_of(recs)
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, f"written twice: {sorted(dupes)[:5]}"
    assert set(keys) == expected, (f"missing {sorted(expected - set(keys))[:5]}, "
                                   f"unexpected {sorted(set(keys) - expected)[:5]}")


def photo_jpeg(size=(1600, 1200), seed=0, **params) -> bytes:
    return pics.encode(pics.photo(size, seed), "JPEG", quality=90, **params)


def noise_png(size=(900, 700), seed=0) -> bytes:
    """Incompressible: even pre-resized to 364 px it stays ~400 KB."""
    bands = [Image.effect_noise(size, 120 + seed + i) for i in range(3)]
    return pics.encode(Image.merge("RGB", bands), "PNG")


def client_env(sim: RunPodSim) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in web.PROXY_ENVS}
    env.update(sim.client_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_main(monkeypatch, capsys, sim: RunPodSim, *argv) -> tuple[int, str, str]:
    for name, value in sim.client_env().items():
        monkeypatch.setenv(name, value)
    code = cd.main([str(a) for a in argv] + ["--endpoint", sim.endpoint_id])
    out, err = capsys.readouterr()
    return code, out, err


def spawn(sim: RunPodSim, *argv, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLIENT), *map(str, argv), "--endpoint",
                             sim.endpoint_id], cwd=REPO,
                            env={**client_env(sim), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def new_jobs(sim: RunPodSim, before: set[str]):
    return [j for j in sim.jobs() if j.id not in before]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# --- pure logic ------------------------------------------------------------------------------

def test_body_size_is_measured_on_the_json_the_sdk_sends():
    fields = {"prompt": "une photo d’un chat — 猫", "num_beams": 3, "top_p": 0.9,
              "include_prompt": True}
    entries = ["data:image/webp;base64," + "QUJD" * 1000, "https://example.com/ä b.jpg?x=1",
               "https://example.com/\u2028\"quoted\"", "data:image/png;base64,AAAA"]
    envelope = packing.envelope_bytes(fields)
    for n in range(len(entries) + 1):
        body = {"input": {**fields, "data_urls": entries[:n]}}
        assert packing.body_bytes(envelope, [packing.json_len(e) for e in entries[:n]]) \
            == len(json.dumps(body).encode())


def test_a_torn_last_line_is_dropped_and_the_rest_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    good = [{"source": "a.jpg", "image_path": "a.jpg", "caption": "x"},
            {"source": "b.jpg", "image_path": "b.jpg", "error": "bad"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"source": "c.jp')
    f = outfiles.LineFile(str(path))
    assert f.load() == good and f.torn == len('{"source": "c.jp')
    assert path.read_text().endswith('"bad"}\n')  # truncated on disk, so appends stay whole
    f.append([{"source": "c.jpg", "image_path": "c.jpg", "caption": "y"}])
    assert [r["source"] for r in outfiles.LineFile(str(path)).load()] == ["a.jpg", "b.jpg", "c.jpg"]
    path.write_text(json.dumps(good[0]) + "\nnot json\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(outfiles.OutputError, match="line 2 is not JSON"):
        outfiles.LineFile(str(path)).load()


def test_csv_records_with_quotes_and_newlines_and_a_torn_record(tmp_path):
    path = tmp_path / "out.csv"
    f = outfiles.LineFile(str(path), "csv")
    rows = [{"source": "a,1.jpg", "image_path": "a,1.jpg", "caption": 'say "hi"\nthere'},
            {"source": "b.jpg", "image_path": "b.jpg", "error": "broken"}]
    f.append(rows)
    whole = path.read_bytes()
    first = {"error": "", **rows[0]}
    for cut in range(len(whole)):  # a kill at any byte: only whole records survive
        path.write_bytes(whole[:cut])
        assert outfiles.LineFile(str(path), "csv").load() in ([], [first]), cut
    path.write_bytes(whole)
    got = outfiles.LineFile(str(path), "csv").load()
    assert [r["caption"] for r in got] == ['say "hi"\nthere', ""]
    assert list(csv.DictReader(io.StringIO(whole.decode())))[1]["error"] == "broken"
    path.write_text("url,caption\nx,y\n")
    with pytest.raises(outfiles.OutputError, match="header"):
        outfiles.LineFile(str(path), "csv").load()


def test_retry_failed_rewrites_without_the_retried_error_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    recs = [{"source": "a", "image_path": "a", "caption": "x"},
            {"source": "b", "image_path": "b", "error": "e"},
            {"source": "c", "image_path": "c", "error": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = outfiles.Output("jsonl", str(path), [])
    existing = out.load()
    assert existing.done == {("a", "a")} and existing.failed == {("b", "b"), ("c", "c")}
    out.forget({("b", "b")})
    assert [r["source"] for r in records(path)] == ["a", "c"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_zip_is_listed_complete_beside_out_until_its_errors_are_retried(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps({"source": "z", "image_path": "a", "caption": "x"}) + "\n"
                    + json.dumps({"source": "z", "image_path": "b", "error": "e"}) + "\n")
    out = outfiles.Output("jsonl", str(path), [])
    assert out.load().complete == set()
    out.mark_complete(["z", "y"])
    assert json.loads((tmp_path / "o.jsonl.zips.json").read_text()) == {"complete": ["y", "z"]}
    again = outfiles.Output("jsonl", str(path), [])
    assert again.load().complete == {"z"}  # y has no line in --out: not taken as complete
    again.forget({("z", "b")})  # the list first: a kill before the rewrite loses nothing
    assert outfiles.Output("jsonl", str(path), []).load().complete == set()
    assert keys_of(records(path)) == [("z", "a")] and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("state, verdict", [
    ({"status": "COMPLETED", "output": {"captions": []}}, "ok"),
    ({"status": "COMPLETED", "output": {"captions": [], "refresh_worker": True}}, "retry"),
    ({"status": "COMPLETED", "output": None}, "retry"),
    ({"status": "FAILED", "error": "invalid input: num_beams: must be ..."}, "final"),
    ({"status": "FAILED", "error": "no image could be captioned (2 failed): a: x; b: y"},
     "all_failed"),
    ({"status": "FAILED", "error": "the GPU failed while captioning (...); this worker will be "
                                   "replaced, please retry the job"}, "retry"),
    ({"status": "FAILED", "error": json.dumps({"error_type": "x", "error_message": "boom"})},
     "retry"),
    ({"status": "TIMED_OUT"}, "retry"),
    ({"status": "CANCELLED"}, "retry"),
    ({"status": "SOMETHING_NEW"}, "retry"),
])
def test_outcome_table(state, verdict):
    assert outcomes.classify(state)[0] == verdict


def test_each_image_gets_its_own_reason_when_no_image_could_be_captioned():
    message = ("no image could be captioned (3 failed): data_urls[0]: the server answered HTTP "
               "404 Not Found; check the URL; data_urls[1]: not a readable image: x; y; "
               "data_urls[10]: empty")
    reasons = outcomes.split_reasons(message, ["data_urls[0]", "data_urls[1]", "data_urls[10]",
                                         "data_urls[2]"])
    assert reasons == {"data_urls[0]": "the server answered HTTP 404 Not Found; check the URL",
                       "data_urls[1]": "not a readable image: x; y", "data_urls[10]": "empty"}


def test_rows_map_worker_labels_back_to_items():
    a = work.Item("https://h/a.jpg", "https://h/a.jpg", "url", "https://h/a.jpg")
    z = work.Item("https://h/z.zip", "https://h/z.zip", "url", "https://h/z.zip")
    b = work.Item("https://h/b.jpg", "https://h/b.jpg", "url", "https://h/b.jpg")
    job = work.Job([a, z, b], {}, 0, {it.ref: it for it in (a, z, b)})
    output = {"captions": [{"image_path": "https://h/a.jpg", "caption": "A",
                            "alternatives": ["A2"]},
                           {"image_path": "https://h/z.zip/in/c.jpg", "caption": "C"}],
              "errors": [{"image_path": "https://h/z.zip/d.jpg", "error": "bad"}]}
    rows, missing = outcomes.rows_from_output(job, output, done=set())
    assert [(r.source, r.image_path, r.caption, r.error) for r in rows] == [
        ("https://h/a.jpg", "https://h/a.jpg", "A", None),
        ("https://h/z.zip", "in/c.jpg", "C", None), ("https://h/z.zip", "d.jpg", None, "bad")]
    assert rows[0].alternatives == ["A2"] and missing == [b]
    zjob = work.Job([z], {}, 0, {z.ref: z})
    zjob.items[0].kind = "zip"
    rows, missing = outcomes.rows_from_output(zjob, {"captions": [{"image_path": "in/c.jpg",
                                                             "caption": "C"},
                                                            {"image_path": "e.jpg",
                                                             "caption": "E"}]},
                                        done={("https://h/z.zip", "e.jpg")})
    assert [(r.image_path, r.caption) for r in rows] == [("in/c.jpg", "C")] and not missing


def test_a_lone_zip_in_a_url_list_and_zips_already_written_count_as_mentioned():
    z = work.Item("https://h/z.zip", "https://h/z.zip", "url", "https://h/z.zip")
    b = work.Item("https://h/b.jpg", "https://h/b.jpg", "url", "https://h/b.jpg")
    alone = work.Job([z], {}, 0, {z.ref: z})  # one source: the worker names members bare
    rows, missing = outcomes.rows_from_output(alone, {"captions": [
        {"image_path": "in/c.jpg", "caption": "C"}]}, done=set())
    assert [(r.source, r.image_path) for r in rows] == [(z.ref, "in/c.jpg")] and not missing
    job = work.Job([z, b], {}, 0, {it.ref: it for it in (z, b)})
    rows, missing = outcomes.rows_from_output(job, {"captions": [
        {"image_path": "https://h/z.zip/c.jpg", "caption": "C"}]}, done={(z.ref, "c.jpg")})
    assert not rows and missing == [b]  # every member of z was written before: z was answered


SIGNED = ("http://127.0.0.1:9/photos/set/{}.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-"
          "Credential=id%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
          "&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "ab" * 32)


def bare_run(tmp_path: Path, items: list, retries: int = 3) -> "fanout.Run":
    """A Run whose outcomes are settled by hand (no endpoint): what settle() writes."""
    out = outfiles.Output("jsonl", str(tmp_path / "o.jsonl"), items)
    args = argparse.Namespace(max_in_flight=1, retries=retries, preresize=False, image_size=364,
                              max_body_bytes=packing.MAX_BODY_BYTES, images_per_job=256)
    run = fanout.Run(args, {}, None, items, out, out.load(), None, _NoBar())
    run.job_pool.shutdown()
    run.prep_pool.shutdown()
    return run


def s3_job(n: int) -> tuple[list, "work.Job"]:
    items = [work.Item(f"s3://photos/set/{i}.jpg", f"s3://photos/set/{i}.jpg", "s3",
                       f"set/{i}.jpg", bucket="photos") for i in range(n)]
    return items, work.Job(items, {}, 0, {SIGNED.format(i): it for i, it in enumerate(items)})


def test_a_rejected_jobs_reason_is_written_without_presigned_queries(tmp_path):
    items, job = s3_job(1)
    run = bare_run(tmp_path, items)
    run.settle(job, work.Result("rejected", reason="the endpoint refused the job: HTTP 400 on "
                                                   f"/run (bad url {SIGNED.format(0)})"))
    [rec] = records(tmp_path / "o.jsonl")
    assert "refused" in rec["error"] and "X-Amz-" not in rec["error"]


def test_s3_images_get_their_own_reasons_when_no_image_could_be_captioned(tmp_path):
    items, job = s3_job(2)
    message = worker_output.nothing_captioned_message(
        [{"image_path": SIGNED.format(0), "error": f"HTTP 403 for {SIGNED.format(0)}"},
         {"image_path": SIGNED.format(1), "error": "not a readable image"}], 0)
    bare_run(tmp_path, items).settle(job, work.Result("state", state={"status": "FAILED",
                                                                      "error": message}))
    errors = {r["source"]: r["error"] for r in records(tmp_path / "o.jsonl")}
    assert errors == {items[0].source: "HTTP 403 for http://127.0.0.1:9/photos/set/0.jpg?...",
                      items[1].source: "not a readable image"}


def test_a_row_already_written_is_never_written_again(tmp_path):
    z = work.Item("https://h/z.zip", "https://h/z.zip", "zip", "https://h/z.zip")
    (tmp_path / "o.jsonl").write_text(json.dumps({"source": z.ref, "image_path": z.ref,
                                                  "error": "HTTP 404"}) + "\n")
    run = bare_run(tmp_path, [z], retries=0)
    job = work.Job([z], {}, 0, {z.ref: z})
    run.settle(job, work.Result("state", state={"status": "FAILED", "error": "invalid input: x"}))
    run.settle(job, work.Result("rejected", reason="HTTP 400"))
    run.settle(job, work.Result("lost", reason="gone"))
    assert len(records(tmp_path / "o.jsonl")) == 1 and run.stats.failed == 0


def zip_answer(z: "work.Item") -> tuple["work.Job", "work.Result"]:
    """A COMPLETED job of zip source ``z``, members named bare: two captions and an error."""
    output = {"captions": [{"image_path": "a.jpg", "caption": "A"},
                           {"image_path": "in/b.png", "caption": "B"}],
              "errors": [{"image_path": "c.jpg", "error": "bad"}]}
    return (work.Job([z], {}, 0, {z.ref: z}),
            work.Result("state", state={"status": "COMPLETED", "output": output}))


def test_a_zip_is_listed_complete_only_once_its_block_is_written(tmp_path, monkeypatch):
    z = work.Item("https://h/z.zip", "https://h/z.zip", "zip", "https://h/z.zip")
    run = bare_run(tmp_path, [z])
    on_disk = []  # the keys in --out at the moment the zip is listed complete
    real = run.output.mark_complete

    def listing(sources):
        sources = list(sources)
        on_disk.append((sources, keys_of(records(tmp_path / "o.jsonl"))))
        real(sources)

    monkeypatch.setattr(run.output, "mark_complete", listing)
    run.settle(*zip_answer(z))
    assert on_disk == [([z.ref], [(z.ref, "a.jpg"), (z.ref, "in/b.png"), (z.ref, "c.jpg")])]
    assert json.loads((tmp_path / "o.jsonl.zips.json").read_text()) == {"complete": [z.ref]}


def test_a_zip_whose_block_cannot_be_written_is_not_listed_complete(tmp_path):
    z = work.Item("https://h/z.zip", "https://h/z.zip", "zip", "https://h/z.zip")
    run = bare_run(tmp_path, [z])
    (tmp_path / "o.jsonl").mkdir()  # appending to --out now fails (IsADirectoryError)
    with pytest.raises(OSError):
        run.settle(*zip_answer(z))
    assert not (tmp_path / "o.jsonl.zips.json").exists()


def test_retry_after_header():
    class R:
        def __init__(self, value):
            self.headers = {"Retry-After": value} if value is not None else {}
    assert retry_after(R("2")) == 2 and retry_after(R("0.2")) == 0.2
    assert retry_after(R(None)) is None and retry_after(R("soon")) is None
    assert retry_after(R("Thu, 01 Jan 1970 00:00:00 GMT")) == 0


def test_url_lists(tmp_path):
    urls = ["https://e.com/a.jpg", "https://e.com/b,c.jpg"]
    (tmp_path / "l.txt").write_text("# comment\n\n" + "\n".join(urls) + "\n")
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "url"])
        w.writerows([[i, u] for i, u in enumerate(urls)])
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"url": u, "k": 1}) + "\n" for u in urls))
    for name in ("l.txt", "l.csv", "l.jsonl"):
        assert sources.read_url_list(str(tmp_path / name)) == urls
    (tmp_path / "bad.csv").write_text("link\nhttps://e.com/a.jpg\n")
    with pytest.raises(sources.UsageError, match="no `url` column"):
        sources.read_url_list(str(tmp_path / "bad.csv"))
    items = sources.url_items(["ftp://e.com/x.jpg", urls[0]])
    assert [i.kind for i in items] == ["bad", "url"] and "ftp" in items[0].ref


def kinds_of_images() -> dict[str, bytes]:
    """The five kinds the pre-resize guarantee is checked on, each large enough to be
    pre-resized (over RAW_FLOOR, and larger than its 364 px lossless copy)."""
    photo = pics.photo((1200, 900), seed=4)
    dithered = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=256,
                             dither=Image.Dither.FLOYDSTEINBERG)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"photo.jpg": photo_jpeg(seed=1),
            "photo.png": pics.encode(pics.photo((700, 500), seed=2), "PNG"),
            "rotated.jpg": pics.encode(pics.photo((1600, 900), seed=3), "JPEG",
                                       quality=90, exif=exif),
            "cmyk.jpg": pics.encode(photo.convert("CMYK"), "JPEG", quality=90),
            "palette.png": pics.encode(dithered, "PNG", transparency=0)}


def worker_pixels(data: bytes, cfg) -> np.ndarray:
    """What the worker feeds the model for this file: decode_image, then preprocess.resize."""
    from preprocess import IMAGE_SIZE, resize
    src = ImageSource((0, 0), "x", lambda: io.BytesIO(data))
    return np.asarray(resize(decode_image(src, cfg, IMAGE_SIZE), IMAGE_SIZE))


def test_preresized_files_give_the_worker_exactly_the_same_pixels():
    cfg = config.Config.from_env({})
    for name, data in kinds_of_images().items():
        small = packing.preresize_bytes(data, name, 364, cfg)
        assert small[:4] == b"RIFF" and len(small) < len(data), name
        assert np.array_equal(worker_pixels(small, cfg), worker_pixels(data, cfg)), name


def test_the_client_imports_no_torch_unless_pre_resizing():
    code = ("import sys; import caption_dataset; assert 'torch' not in sys.modules, 'torch'; "
            "import preprocess; assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "src",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_flags_and_sources_exit_2_naming_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUNPOD_API_KEY", "k")
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", f"http://127.0.0.1:{free_port()}/v2")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    out = str(tmp_path / "o.jsonl")
    cases = [
        (["--num-beams", "0"], "--num-beams"),
        (["--num-captions", "4", "--num-beams", "2"], "--num-captions: must be at most --num-beams"),
        (["--images-per-job", "5000"], "MAX_IMAGES_PER_JOB"),
        (["--max-body-bytes", "20000000"], "--max-body-bytes"),
        (["--format", "hf", "--out", str(tmp_path / "elsewhere" / "metadata.jsonl")],
         "not inside"),
    ]
    for flags, named in cases:
        argv = [str(tmp_path / "imgs"), "--endpoint", "e", "--out", out, *flags]
        assert cd.main(argv) == 2, flags
        assert named in capsys.readouterr().err, flags
    for fmt in ("hf", "txt"):
        assert cd.main(["https://e.com/a.zip", "--endpoint", "e", "--out", out,
                        "--format", fmt]) == 2
        assert "is not a folder" in capsys.readouterr().err
    assert cd.main([str(tmp_path / "nothing"), "--endpoint", "e", "--out", out]) == 2
    assert "not a folder, a URL list" in capsys.readouterr().err
    assert cd.main([str(tmp_path / "imgs"), "--endpoint", "e", "--out",
                    str(tmp_path / "no" / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert cd.main([str(tmp_path / "imgs"), "--endpoint", "e", "--out", out]) == 2
    assert "RUNPOD_API_KEY" in capsys.readouterr().err
    assert not os.path.exists(out)


# --- against the simulator, with two real workers --------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    with RunPodSim() as sim:
        workers = [WorkerProcess(sim, name, REPO, logs / f"{name}.log",
                                 MAX_CONCURRENT_JOBS="4", BLIP_DTYPE="float32")
                   for name in ("w1", "w2")]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready()
            yield sim, workers
        finally:
            for w in workers:
                w.close()


@pytest.fixture
def sim(fleet):
    sim, _ = fleet
    sim.throttle(0)
    sim.throttle_rate(0)
    sim.pause_takes(False)
    return sim


def mixed_folder(root: Path, n: int) -> tuple[set, set]:
    """``n`` images in five formats over three folders; every 15th one broken in one of three
    ways. Returns (good, broken) sets of relative paths."""
    good, broken = set(), set()
    formats = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".gif"),
               ("BMP", ".bmp")]
    for i in range(n):
        fmt, ext = formats[i % len(formats)]
        rel = f"sub{i % 3}/img{i:03d}{ext}"
        if i % 15 == 7:
            data = [pics.truncated_jpeg(seed=i), b"not an image at all", b""][i // 15 % 3]
            rel = f"sub{i % 3}/broken{i:03d}.jpg"
            broken.add(rel)
        else:
            data = pics.image_bytes(fmt, seed=i, size=(48 + i % 17, 40))
            good.add(rel)
        write(root / rel, data)
    return good, broken


def test_two_workers_300_mixed_images_each_exactly_once(sim, fleet, tmp_path, monkeypatch,
                                                        capsys):
    good, broken = mixed_folder(tmp_path / "ds", 300)
    out = tmp_path / "captions.jsonl"
    before = {j.id for j in sim.jobs()}
    code, stdout, _ = run_main(monkeypatch, capsys, sim, tmp_path / "ds", "--out", out,
                               "--images-per-job", "16", *FAST)
    assert code == 1, stdout  # some images are broken
    recs = records(out)
    assert_exactly_once(recs, {(p, p) for p in good | broken})
    assert {r["source"] for r in recs if "error" in r} == broken
    assert all(r["caption"] for r in recs if "error" not in r)
    jobs = new_jobs(sim, before)
    assert {j.worker_id for j in jobs} == {"w1", "w2"}, "both workers took jobs"
    assert all(j.status == "COMPLETED" for j in jobs) and len(jobs) == 300 // 16 + 1
    assert f"captioned {len(good)}, failed {len(broken)}" in stdout
    # run again: nothing is sent, nothing is written twice
    code, stdout, _ = run_main(monkeypatch, capsys, sim, tmp_path / "ds", "--out", out, *FAST)
    assert code == 1 and "skipped 300" in stdout and "(+20 failed in earlier runs" in stdout
    assert len(records(out)) == 300 and not new_jobs(sim, before)[len(jobs):]


def test_inline_jobs_are_packed_under_the_body_limit(sim, tmp_path, monkeypatch, capsys):
    root = tmp_path / "ds"
    names = []
    for i in range(14):
        names.append(f"p{i:02d}.jpg")
        write(root / names[-1], photo_jpeg((640, 480), seed=i))  # ~45 KB: sent as they are
    write(root / "noise.png", noise_png())  # ~400 KB even pre-resized
    limit = 200_000
    before = {j.id for j in sim.jobs()}
    code, stdout, _ = run_main(monkeypatch, capsys, sim, root, "--out", tmp_path / "o.jsonl",
                               "--max-body-bytes", limit, "--stats", tmp_path / "s.json", *FAST)
    stats = json.loads((tmp_path / "s.json").read_text())
    recs = {r["source"]: r for r in records(tmp_path / "o.jsonl")}
    assert code == 1 and set(recs) == {*names, "noise.png"}
    assert "200,000-byte /run body limit" in recs["noise.png"]["error"]
    assert "URL list" in recs["noise.png"]["error"] and "s3://" in recs["noise.png"]["error"]
    jobs = new_jobs(sim, before)
    sizes = [j.body_bytes for j in jobs]
    assert max(sizes) <= limit and sum(sizes) == stats["body_bytes"]  # measured, not guessed
    entry = max(len(web.data_uri(photo_jpeg((640, 480), seed=i))) for i in range(14))
    assert sum(s <= limit - entry - 2 for s in sizes) <= 1, sizes  # cut only when full
    assert sum(len(j.input["data_urls"]) for j in jobs) == 14


def test_every_format_is_read_back_by_its_tool(sim, tmp_path, monkeypatch, capsys):
    import datasets
    images = {"a.jpg": pics.jpeg(seed=1), "a.png": pics.png(seed=2),
              "sub/b.webp": pics.image_bytes("WEBP", seed=3),
              "sub/deeper/c.JPEG": pics.jpeg(seed=4), "broken.jpg": pics.truncated_jpeg(5)}
    folders = {}
    for fmt in outfiles.FORMATS:
        folders[fmt] = tmp_path / fmt
        for rel, data in images.items():
            write(folders[fmt] / rel, data)
    outs = {"jsonl": tmp_path / "o.jsonl", "csv": tmp_path / "o.csv",
            "hf": folders["hf"] / "metadata.jsonl", "txt": tmp_path / "record.jsonl"}
    for fmt, out in outs.items():
        code, stdout, _ = run_main(monkeypatch, capsys, sim, folders[fmt], "--out", out,
                                   "--format", fmt, *FAST)
        assert code == 1 and "captioned 4, failed 1" in stdout, (fmt, stdout)
    truth = {r["source"]: r.get("caption") for r in records(outs["jsonl"])}
    assert set(truth) == set(images) and truth["broken.jpg"] is None
    with open(outs["csv"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == outfiles.CSV_FIELDS
    assert {r["source"]: r["caption"] or None for r in rows} == truth
    assert [r["error"] != "" for r in rows].count(True) == 1
    ds = datasets.load_dataset("imagefolder", data_dir=str(folders["hf"]), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 4  # the broken image is left out
    assert sorted(ds["text"]) == sorted(c for c in truth.values() if c)
    sidecar = records(folders["hf"] / "metadata.errors.jsonl")
    assert [(r["file_name"], r["source"]) for r in sidecar] == [("broken.jpg", "broken.jpg")]
    txt = folders["txt"]
    expected_files = {"a.txt": "a.jpg", "a.png.txt": "a.png", "sub/b.txt": "sub/b.webp",
                      "sub/deeper/c.txt": "sub/deeper/c.JPEG"}  # caption_folder's names
    found = {str(p.relative_to(txt)): p.read_text() for p in txt.rglob("*.txt")}
    assert found == {f: truth[img] + "\n" for f, img in expected_files.items()}
    record = {r["source"]: r for r in records(outs["txt"])}
    assert record["a.png"]["caption_file"] == "txt/a.png.txt" and "error" in record["broken.jpg"]
    # every format resumes: nothing to do; --retry-failed retries the broken image only
    for fmt, out in outs.items():
        before = out.read_bytes()
        code, stdout, _ = run_main(monkeypatch, capsys, sim, folders[fmt], "--out", out,
                                   "--format", fmt, *FAST)
        assert "skipped 5" in stdout and out.read_bytes() == before, fmt
        code, stdout, _ = run_main(monkeypatch, capsys, sim, folders[fmt], "--out", out,
                                   "--format", fmt, "--retry-failed", *FAST)
        assert "captioned 0, failed 1, skipped 4" in stdout, (fmt, stdout)
    assert_exactly_once(records(outs["jsonl"]), {(p, p) for p in images})
    assert len(records(folders["hf"] / "metadata.errors.jsonl")) == 1
    assert len(records(outs["txt"])) == 5
    with open(outs["csv"], newline="", encoding="utf-8") as fh:
        assert sorted(r["source"] for r in csv.DictReader(fh)) == sorted(images)


def test_preresized_images_get_the_captions_of_the_originals(sim, tmp_path, monkeypatch,
                                                             capsys):
    root = tmp_path / "ds"
    kinds = kinds_of_images()
    for name, data in kinds.items():
        write(root / name, data)
    # control: the same pixels with a bilinear instead of a bicubic resize must caption
    # differently, or this test could not tell a wrong pre-resize from a right one
    from preprocess import IMAGE_SIZE
    cfg = config.Config.from_env({})
    img = decode_image(ImageSource((0, 0), "x", lambda: io.BytesIO(kinds["photo.jpg"])), cfg)
    write(root / "control.png",
          pics.encode(img.resize((IMAGE_SIZE,) * 2, Image.Resampling.BILINEAR), "PNG"))
    got = {}
    for mode in ("--preresize", "--no-preresize"):
        out, stats = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}.json"
        code, stdout, _ = run_main(monkeypatch, capsys, sim, root, "--out", out, mode,
                                   "--stats", stats, *SENSITIVE)
        assert code == 0, stdout
        got[mode] = {r["source"]: [r["caption"], *r["alternatives"]] for r in records(out)}
        got[mode + "stats"] = json.loads(stats.read_text())
    assert got["--preresize"] == got["--no-preresize"]
    assert got["--preresize"]["control.png"] != got["--preresize"]["photo.jpg"]
    pre, raw = got["--preresizestats"], got["--no-preresizestats"]
    assert pre["preresized"] >= 5 and raw["preresized"] == 0
    assert pre["body_bytes"] * 2 < raw["body_bytes"]


def test_each_caption_written_is_that_images_own(sim, http_server, tmp_path, monkeypatch,
                                                capsys):
    """Every line's captions equal those of its image captioned alone (by a worker with the
    endpoint's settings), in jobs that mix inline files and URLs; the images' captions all
    differ, so an image given another's caption cannot pass. And the summary's GPU time is the
    sum of the jobs' caption_s."""
    files = {f"f{i}.jpg": pics.jpeg(seed=900 + i, size=(80 + 8 * i, 60)) for i in range(5)}
    for name, data in files.items():
        write(tmp_path / "ds" / name, data)
    served = {http_server.route(f"/own/u{i}.png", web.body(pics.png(seed=920 + i), "image/png")):
              pics.png(seed=920 + i) for i in range(4)}
    (tmp_path / "urls.txt").write_text("".join(u + "\n" for u in served))
    out, stats = tmp_path / "o.jsonl", tmp_path / "s.json"
    before = {j.id for j in sim.jobs()}
    code, stdout, err = run_main(monkeypatch, capsys, sim, tmp_path / "ds", tmp_path / "urls.txt",
                                 "--out", out, "--images-per-job", "3", "--stats", stats,
                                 *SENSITIVE)
    assert code == 0, err
    got = {r["source"]: [r["caption"], *r["alternatives"]] for r in records(out)}
    assert set(got) == {*files, *served}
    assert len({c[0] for c in got.values()}) == len(got), got  # no two images alike
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0",
                                  "BLIP_DTYPE": "float32"})
    alone_worker = jobs.Worker(cfg, engines.load_engine(cfg))
    try:
        request = {"num_beams": 3, "num_captions": 3, "max_length": 20}
        alone = {}
        for source, data in {**files, **served}.items():
            entry = alone_worker.run({"data_url": web.data_uri(data), **request})["captions"][0]
            alone[source] = [entry["caption"], *entry["alternatives"]]
    finally:
        alone_worker.close()
    assert got == alone
    jobs_run = new_jobs(sim, before)
    assert len(jobs_run) == 3 and all(j.status == "COMPLETED" for j in jobs_run)
    assert any(j.input.get("data_urls") and len({u.startswith("data:")
                                                  for u in j.input["data_urls"]}) == 2
               for j in jobs_run), "a job mixes inline files and URLs"
    gpu_s = sum(j.output["timings"]["caption_s"] for j in jobs_run)
    assert gpu_s > 0 and json.loads(stats.read_text())["gpu_s"] == pytest.approx(gpu_s)
    assert f"GPU time {gpu_s:.1f} s (sum of caption_s)" in stdout


def test_url_list_with_404s(sim, http_server, tmp_path, monkeypatch, capsys):
    urls = [http_server.route(f"/img/{i}.jpg", web.body(pics.jpeg(seed=i), "image/jpeg"))
            for i in range(12)]
    missing = [http_server.url(f"/gone/{i}.jpg") for i in range(3)]
    listed = urls[:6] + missing + urls[6:] + ["ftp://example.com/x.jpg", urls[0]]
    (tmp_path / "urls.txt").write_text("\n".join(listed) + "\n")
    before = {j.id for j in sim.jobs()}
    code, stdout, _ = run_main(monkeypatch, capsys, sim, tmp_path / "urls.txt", "--out",
                               tmp_path / "o.jsonl", "--images-per-job", "5", *FAST)
    assert code == 1
    recs = records(tmp_path / "o.jsonl")
    assert_exactly_once(recs, {(u, u) for u in urls + missing + ["ftp://example.com/x.jpg"]})
    errors = {r["source"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {*missing, "ftp://example.com/x.jpg"}
    assert all("404" in errors[u] for u in missing) and "ftp" in errors["ftp://example.com/x.jpg"]
    sent = [u for j in new_jobs(sim, before) for u in j.input["data_urls"]]
    assert sorted(sent) == sorted(urls + missing)  # the ftp line never went out; no duplicate
    assert "1 duplicates ignored" in stdout


def test_zip_url_source_members_become_lines_and_resume(sim, http_server, tmp_path,
                                                        monkeypatch, capsys):
    data = make_zip([("a.jpg", pics.jpeg(seed=1)), ("in/b.png", pics.png(seed=2)),
                     ("broken.jpg", pics.truncated_jpeg(seed=3)),
                     ("notes.txt", b"side file")])
    url = http_server.route("/photos.zip", web.body(data, "application/zip"))
    out = tmp_path / "o.jsonl"
    code, _, _ = run_main(monkeypatch, capsys, sim, url, "--out", out, *FAST)
    assert code == 1
    assert_exactly_once(records(out), {(url, "a.jpg"), (url, "in/b.png"), (url, "broken.jpg")})
    first = out.read_bytes()
    code, stdout, _ = run_main(monkeypatch, capsys, sim, url, "--out", out, *FAST)
    assert out.read_bytes() == first and code == 1
    code, stdout, _ = run_main(monkeypatch, capsys, sim, url, "--out", out, "--retry-failed",
                               *FAST)
    assert "captioned 0, failed 1" in stdout, stdout
    assert_exactly_once(records(out), {(url, "a.jpg"), (url, "in/b.png"), (url, "broken.jpg")})


def test_a_failed_zip_source_is_neither_rerun_nor_written_twice(sim, http_server, tmp_path,
                                                               monkeypatch, capsys):
    url = http_server.url("/gone/photos.zip")
    out = tmp_path / "o.jsonl"
    args = [url, "--out", out, "--retries", "0", *FAST]
    code, _, _ = run_main(monkeypatch, capsys, sim, *args)
    [rec] = records(out)
    assert code == 1 and keys_of([rec]) == [(url, url)] and "404" in rec["error"]
    first, before = out.read_bytes(), {j.id for j in sim.jobs()}
    code, stdout, _ = run_main(monkeypatch, capsys, sim, *args)
    assert code == 1 and out.read_bytes() == first and not new_jobs(sim, before), stdout
    code, stdout, _ = run_main(monkeypatch, capsys, sim, *args, "--retry-failed")
    assert code == 1 and len(records(out)) == 1 and len(new_jobs(sim, before)) == 1, stdout


def test_a_zip_in_a_url_list_gets_its_members_and_resumes(sim, http_server, tmp_path,
                                                          monkeypatch, capsys):
    data = make_zip([("a.jpg", pics.jpeg(seed=5)), ("in/b.png", pics.png(seed=6))])
    zurl = http_server.route("/list/photos.zip", web.body(data, "application/zip"))
    img = http_server.route("/list/c.jpg", web.body(pics.jpeg(seed=7), "image/jpeg"))
    (tmp_path / "urls.txt").write_text(f"{zurl}\n{img}\n")
    out = tmp_path / "o.jsonl"
    expected = {(zurl, "a.jpg"), (zurl, "in/b.png"), (img, img)}
    for per_job in ("1", "2"):  # the zip alone in its job (members named bare), or with c.jpg
        out.unlink(missing_ok=True)
        args = [tmp_path / "urls.txt", "--out", out, "--images-per-job", per_job,
                "--retries", "1", *FAST]
        code, _, err = run_main(monkeypatch, capsys, sim, *args)
        assert code == 0, err
        assert_exactly_once(records(out), expected)
        first, before = out.read_bytes(), {j.id for j in sim.jobs()}
        code, stdout, err = run_main(monkeypatch, capsys, sim, *args)
        assert code == 0 and out.read_bytes() == first, stdout + err
        assert not new_jobs(sim, before) and "skipped 2" in stdout  # listed complete


def test_a_zip_cut_off_by_a_kill_is_completed_wherever_its_lines_are(sim, http_server,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    data = make_zip([("a.jpg", pics.jpeg(seed=11)), ("b.jpg", pics.jpeg(seed=12)),
                     ("c.png", pics.png(seed=13))])
    url = http_server.route("/cut/photos.zip", web.body(data, "application/zip"))
    img = http_server.route("/cut/d.jpg", web.body(pics.jpeg(seed=14), "image/jpeg"))
    (tmp_path / "urls.txt").write_text(img + "\n")
    out = tmp_path / "o.jsonl"
    # run 1 was killed mid-way through the zip's block; run 2 wrote another job's line after it
    # and was killed before the zip's job settled: the zip's lines are no longer the last
    out.write_text(json.dumps({"source": url, "image_path": "a.jpg", "caption": "x"}) + "\n"
                   + json.dumps({"source": img, "image_path": img, "caption": "y"}) + "\n")
    args = [url, tmp_path / "urls.txt", "--out", out, *FAST]
    code, stdout, err = run_main(monkeypatch, capsys, sim, *args)
    assert code == 0, err
    assert_exactly_once(records(out), {(url, "a.jpg"), (url, "b.jpg"), (url, "c.png"),
                                       (img, img)})
    assert records(out)[0]["caption"] == "x" and "skipped 1" in stdout, stdout
    first, before = out.read_bytes(), {j.id for j in sim.jobs()}
    code, stdout, _ = run_main(monkeypatch, capsys, sim, *args)
    assert code == 0 and out.read_bytes() == first and not new_jobs(sim, before), stdout


@pytest.fixture(scope="module")
def s3_bucket():
    with moto_bucket("photos", "id", "secret-value") as server:
        yield server


def test_s3_source(sim, s3_bucket, tmp_path, monkeypatch, capsys):
    endpoint, client = s3_bucket
    keys = [f"set/{i}.jpg" for i in range(5)] + ["set/deep/x.png"]
    for i, key in enumerate(keys):
        client.put_object(Bucket="photos", Key=key, Body=pics.jpeg(seed=40 + i))
    for key, body in (("set/readme.md", b"#"), ("set/.hidden.jpg", pics.jpeg(seed=9)),
                      ("other/y.jpg", pics.jpeg(seed=8))):
        client.put_object(Bucket="photos", Key=key, Body=body)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "secret-value")
    before = {j.id for j in sim.jobs()}
    code, stdout, err = run_main(monkeypatch, capsys, sim, "s3://photos/set", "--out",
                                 tmp_path / "o.jsonl", *FAST)
    assert code == 0, err
    recs = records(tmp_path / "o.jsonl")
    assert_exactly_once(recs, {(f"s3://photos/{k}", f"s3://photos/{k}") for k in keys})
    text = (tmp_path / "o.jsonl").read_text() + stdout + err
    assert "X-Amz-Signature" not in text and "secret-value" not in text
    sent = [u for j in new_jobs(sim, before) for u in j.input["data_urls"]]
    assert len(sent) == 6 and all("X-Amz-Signature" in u and u.startswith(endpoint)
                                  for u in sent)


def test_429_storms(sim, http_server, tmp_path, monkeypatch, capsys):
    urls = [http_server.route(f"/s/{i}.png", web.body(pics.png(seed=i), "image/png"))
            for i in range(30)]
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps({"url": u}) + "\n" for u in urls))
    before429 = sim.counts["429"]
    sim.throttle(4, retry_after=0.2, calls=("run",))  # the SDK does not retry POSTs: we do
    # then 40% of /run and /status answer 429 (Retry-After in whole seconds: urllib3, which
    # the SDK retries GETs with, refuses fractions); some /status calls see six in a row
    sim.throttle_rate(0.4, retry_after=1, calls=("run", "status"), seed=3)
    try:
        code, stdout, err = run_main(monkeypatch, capsys, sim, tmp_path / "urls.jsonl",
                                     "--out", tmp_path / "o.jsonl", "--images-per-job", "3",
                                     "--stats", tmp_path / "s.json", *FAST)
    finally:
        sim.throttle_rate(0)
    assert code == 0, err
    assert_exactly_once(records(tmp_path / "o.jsonl"), {(u, u) for u in urls})
    assert sim.counts["429:run"] >= 4 and sim.counts["429:status"] > 0
    assert sim.counts["429"] - before429 >= 10
    assert json.loads((tmp_path / "s.json").read_text())["throttled"] >= 4


def test_client_killed_mid_run_then_rerun_loses_and_duplicates_nothing(sim, tmp_path):
    good, _ = mixed_folder(tmp_path / "ds", 56)
    good = {p for p in good}
    for p in list((tmp_path / "ds").rglob("broken*")):
        p.unlink()
    out = tmp_path / "o.jsonl"
    args = [tmp_path / "ds", "--out", out, "--images-per-job", "2", "--max-in-flight", "2",
            *FAST]
    proc = spawn(sim, *args)
    try:
        wait_until(lambda: line_count(out) >= 6, 120, "some lines written")
    finally:
        proc.kill()
        proc.wait(30)
    with open(out, "ab") as fh:  # and as if the kill had landed mid-write
        fh.write(b'{"source": "sub0/img000.jpg", "image_pa')
    written = line_count(out)
    assert written < len(good), "the run finished before it was killed: kill sooner"
    proc = spawn(sim, *args)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert "torn last line" in stderr and f"skipped {written}" in stdout
    assert_exactly_once(records(out), {(p, p) for p in good})
    assert sim.api_key not in stdout + stderr


def test_ctrl_c_cancels_jobs_in_flight_writes_what_finished_and_exits_130(sim, tmp_path):
    root = tmp_path / "ds"
    for i in range(30):
        write(root / f"{i:02d}.png", pics.png(seed=100 + i))
    out = tmp_path / "o.jsonl"
    args = [root, "--out", out, "--images-per-job", "2", "--max-in-flight", "3", *FAST]
    before = {j.id for j in sim.jobs()}
    proc = spawn(sim, *args)
    try:
        wait_until(lambda: line_count(out) >= 2, 120, "a job finished")
        sim.pause_takes(True)
        wait_until(lambda: any(j.status == "IN_QUEUE" for j in new_jobs(sim, before)), 60,
                   "a job waits in the queue")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        sim.pause_takes(False)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stdout and "cancelling" in stderr
    jobs = new_jobs(sim, before)
    assert not [j for j in jobs if j.status == "IN_QUEUE"], "every queued job was cancelled"
    cancelled = [j for j in jobs if j.status == "CANCELLED"]
    assert cancelled
    completed = sum(len(j.input["data_urls"]) for j in jobs if j.status == "COMPLETED")
    assert completed and len(records(out)) == completed  # what finished is written, once
    proc = spawn(sim, *args)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert_exactly_once(records(out), {(f"{i:02d}.png",) * 2 for i in range(30)})


def queued_client(sim: RunPodSim, tmp_path: Path) -> tuple[subprocess.Popen, list]:
    """A client subprocess whose 3 jobs wait in the endpoint's queue (takes are paused: call
    ``sim.pause_takes(False)`` after), and those jobs."""
    root = tmp_path / "ds"
    for i in range(6):
        write(root / f"{i}.png", pics.png(seed=140 + i))
    before = {j.id for j in sim.jobs()}
    sim.pause_takes(True)
    proc = spawn(sim, root, "--out", tmp_path / "o.jsonl", "--images-per-job", "2", *FAST)
    wait_until(lambda: len(new_jobs(sim, before)) == 3, 60, "three jobs queued")
    return proc, new_jobs(sim, before)


def test_sigterm_cancels_the_jobs_in_flight_and_exits_143(sim, tmp_path):
    proc, queued = queued_client(sim, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        sim.pause_takes(False)
    assert proc.returncode == 143, stderr[-2000:]
    assert "interrupted" in stdout and "cancelling" in stderr
    assert [sim.job(j.id).status for j in queued] == ["CANCELLED"] * 3
    assert not (tmp_path / "o.jsonl").exists() or not records(tmp_path / "o.jsonl")


def test_a_second_ctrl_c_quits_at_once(sim, tmp_path):
    proc, queued = queued_client(sim, tmp_path)
    try:
        # every /status now answers 429 with Retry-After 20 s, which the SDK waits out before
        # retrying: after the first Ctrl-C, the jobs' last look takes minutes
        sim.throttle(10_000, retry_after=20, calls=("status",))
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)
        assert proc.poll() is None, "the first Ctrl-C waits for the jobs in flight"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        quit_s = time.monotonic() - started
    finally:
        proc.kill()
        sim.throttle(0)
        sim.pause_takes(False)
    assert proc.returncode == 130, stderr[-2000:]
    assert quit_s < 5, quit_s
    assert "interrupted" in stdout and "Traceback" not in stderr


def test_lost_jobs_are_resubmitted(sim, fleet, tmp_path, monkeypatch, capsys):
    """TIMED_OUT on the endpoint, and a result gone before it was read (404)."""
    root = tmp_path / "ds"
    for i in range(4):
        write(root / f"{i}.jpg", pics.jpeg(seed=200 + i))
    before = {j.id for j in sim.jobs()}
    sim.pause_takes(True)  # both jobs wait in the queue until they are ended below
    box = {}

    def client():
        box["code"] = cd.main([str(root), "--out", str(tmp_path / "o.jsonl"), "--endpoint",
                               sim.endpoint_id, "--images-per-job", "2", "--stats",
                               str(tmp_path / "s.json"), *FAST[:4], "--poll-interval", "1.5",
                               "--quiet"])
    for name, value in sim.client_env().items():
        monkeypatch.setenv(name, value)
    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(new_jobs(sim, before)) == 2, 60, "two jobs queued")
        first, second = new_jobs(sim, before)
        sim.time_out(first.id)
        sim.time_out(second.id)
        sim.expire(second.id)  # ended and forgotten long before the client's next poll
    finally:
        sim.pause_takes(False)
        thread.join(120)
    assert box["code"] == 0
    err = capsys.readouterr().err
    assert "the job was TIMED_OUT" in err and "no longer knows the job" in err, err
    assert_exactly_once(records(tmp_path / "o.jsonl"), {(f"{i}.jpg",) * 2 for i in range(4)})
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["resubmitted"] == 4 and stats["jobs"] == 4


def test_a_worker_killed_mid_run_its_jobs_are_resubmitted(sim, fleet, tmp_path, monkeypatch,
                                                          capsys):
    _, workers = fleet
    victim = workers[1]
    root = tmp_path / "ds"
    for i in range(48):
        write(root / f"{i:02d}.jpg", pics.jpeg(seed=300 + i, size=(96, 72)))
    before = {j.id for j in sim.jobs()}
    box = {}
    for name, value in sim.client_env().items():
        monkeypatch.setenv(name, value)

    def client():
        box["code"] = cd.main([str(root), "--out", str(tmp_path / "o.jsonl"), "--endpoint",
                               sim.endpoint_id, "--images-per-job", "3", "--max-in-flight",
                               "6", "--job-timeout", "6", "--stats", str(tmp_path / "s.json"),
                               *FAST])
    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: any(j.worker_id == victim.worker_id and j.status == "IN_PROGRESS"
                               for j in new_jobs(sim, before)), 120, "the victim works")
        victim.kill(signal.SIGKILL)
        held = [j for j in new_jobs(sim, before)
                if j.worker_id == victim.worker_id and j.status == "IN_PROGRESS"]
    finally:
        thread.join(240)
    assert not thread.is_alive() and box["code"] == 0
    assert held, "the victim held jobs when it was killed"
    assert_exactly_once(records(tmp_path / "o.jsonl"), {(f"{i:02d}.jpg",) * 2 for i in range(48)})
    stats = json.loads((tmp_path / "s.json").read_text())
    still = [sim.job(j.id) for j in held]
    lost = [j for j in still if j.status == "CANCELLED"]  # the client gave up on them
    assert lost and stats["resubmitted"] >= sum(len(j.input["data_urls"]) for j in lost)
    assert "no progress for 6 s (IN_PROGRESS" in capsys.readouterr().err


def test_a_wrong_key_or_endpoint_stops_the_run_with_exit_2(sim, tmp_path, monkeypatch, capsys):
    write(tmp_path / "ds" / "a.jpg", pics.jpeg(seed=1))
    out = tmp_path / "o.jsonl"
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", sim.base_url)
    monkeypatch.setenv("RUNPOD_API_KEY", "wrong-key-123")
    code = cd.main([str(tmp_path / "ds"), "--endpoint", sim.endpoint_id, "--out", str(out),
                    *FAST])
    stdout, err = capsys.readouterr()
    assert code == 2 and "refused RUNPOD_API_KEY" in err
    assert "wrong-key-123" not in stdout + err
    monkeypatch.setenv("RUNPOD_API_KEY", sim.api_key)
    code = cd.main([str(tmp_path / "ds"), "--endpoint", "no-such-endpoint", "--out", str(out),
                    *FAST])
    assert code == 2 and "'no-such-endpoint' not found" in capsys.readouterr().err
    assert not out.exists() or not records(out)
