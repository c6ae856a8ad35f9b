"""Captions as files (``output_format: "zip"``): the naming rules on their own, whole jobs
through jobs.Worker on the tiny model with every zip read back by zipfile, uploads to a real
S3-compatible server (moto's, started on 127.0.0.1), and one job through runpod's local API
with the bucket set in its environment."""
import base64
import io
import logging
import os
import posixpath
import zipfile

import pytest
import requests
from hypothesis import given, settings, strategies as st

import config
import deliver
import engines as engine_mod
import jobs
import schema
from support import web
from support import images as pics
from support.s3 import moto_bucket
from support.worker import FAST, ApiServer, free_port
from support.zips import corrupt_entry, make_zip

SECRET = "test-secret-key-never-shown"


# --- helpers ---------------------------------------------------------------------------------

def read_zip(data: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        return {name: zf.read(name).decode("utf-8") for name in zf.namelist()}


def inline_zip(out: dict) -> dict[str, str]:
    assert "captions_zip_error" not in out, out["captions_zip_error"]
    return read_zip(base64.b64decode(out["captions_zip"], validate=True))


def captions_by_path(out: dict) -> dict[str, list[str]]:
    return {c["image_path"]: [c["caption"], *c.get("alternatives", [])] for c in out["captions"]}


def lines(text: str) -> list[str]:
    assert text.endswith("\n")
    return text[:-1].split("\n")


def request_for(**fields) -> schema.CaptionRequest:
    return schema.parse_request({"output_format": "zip", **fields}, config.defaults())


def zip_fields(cfg: config.Config, rows=None, job_id: str = "job-unit") -> dict:
    rows = rows or [((0, 0), {"image_path": "a.jpg", "caption": "a cat"})]
    request = request_for(data_url="data:application/zip;base64,UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==")
    members = {order: row["image_path"] for order, row in rows}
    return deliver.zip_fields(request, rows, members, job_id, cfg)


# --- naming (no model) -----------------------------------------------------------------------

def test_names_are_stems_and_collisions_keep_both_files():
    names = deliver.CaptionNames()
    got = ["/".join(names.caption_file(("d",), n))
           for n in ("a.jpg", "a.png", "A.gif", "a.png", "b.tar.gif", "noext")]
    assert got == ["d/a.txt", "d/a.png.txt", "d/A.gif.txt", "d/a-2.txt", "d/b.tar.txt",
                   "d/noext.txt"]
    assert names.folder("photos") == "photos" and names.folder("Photos") == "Photos-2"


@pytest.mark.parametrize("name,expected", [
    ("../../x.jpg", ["x.jpg"]), ("/abs/x.jpg", ["abs", "x.jpg"]),
    ("back\\slash.jpg", ["back", "slash.jpg"]), ("C:\\win\\x.jpg", ["win", "x.jpg"]),
    ("a/./b/../c.jpg", ["a", "b", "c.jpg"]), ("ctl\x01\x7f.jpg", ["ctl__.jpg"]), ("..", []),
])
def test_unsafe_member_names_are_made_safe(name, expected):
    assert deliver.safe_parts(name) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=300),
                min_size=1, max_size=6))
def test_no_name_can_leave_the_zip(tmp_path_factory, raw_names):
    names = deliver.CaptionNames()
    paths = ["/".join(names.caption_file(tuple(parts[:-1]), parts[-1]))
             for parts in (deliver.safe_parts(n) or ["x"] for n in raw_names)]
    for path in paths:
        parts = path.split("/")
        assert posixpath.normpath(path) == path and not path.startswith("/"), path
        assert ".." not in parts and "\\" not in path and path.endswith(".txt"), path
        assert all(p and len(p.encode()) <= deliver.MAX_PART_BYTES for p in parts), path
        assert not any(ord(c) < 32 for c in path), path
    assert len({p.casefold() for p in paths}) == len(paths)
    target = tmp_path_factory.mktemp("extract")
    with zipfile.ZipFile(io.BytesIO(deliver.build_zip((p, "c\n") for p in paths))) as zf:
        zf.extractall(target)
    written = [os.path.join(d, f) for d, _, fs in os.walk(target) for f in fs]
    assert len(written) == len(paths)
    assert all(os.path.realpath(w).startswith(str(target.resolve()) + os.sep) for w in written)


def test_file_content_is_one_caption_per_line():
    assert deliver.caption_text(["best", "second\r\n line", " third\u2028x "]) == \
        "best\nsecond line\nthird x\n"


@given(st.lists(st.text(), min_size=1, max_size=5))
def test_every_caption_is_exactly_one_line(captions):
    text = deliver.caption_text(captions)
    assert text.endswith("\n") and len(text.splitlines()) == len(captions)


# --- delivery without a model ----------------------------------------------------------------

def test_zip_over_the_inline_limit_is_an_error_entry_not_a_failure():
    out = zip_fields(config.defaults().replace(max_inline_zip_bytes=50))
    assert set(out) == {"captions_zip_error"}
    message = out["captions_zip_error"]
    assert "MAX_INLINE_ZIP_BYTES" in message and "BUCKET_ENDPOINT_URL" in message
    assert "Every caption is in `captions`" in message
    assert set(zip_fields(config.defaults())) == {"captions_zip"}


def test_bucket_settings_go_together():
    with pytest.raises(config.ConfigError) as info:
        config.Config.from_env({"BUCKET_NAME": "caps", "BUCKET_SECRET_ACCESS_KEY": SECRET})
    message = str(info.value)
    assert "BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID unset" in message and SECRET not in message
    with pytest.raises(config.ConfigError, match="BUCKET_ENDPOINT_URL: must be an http"):
        config.Config.from_env(bucket_env("s3.example.com", "caps"))
    assert SECRET not in repr(config.Config.from_env(bucket_env("http://127.0.0.1:9", "caps")))


def test_output_format_is_validated_like_every_field():
    with pytest.raises(Exception) as info:
        request_for(data_url="https://example.com/a.jpg", output_format="csv")
    assert str(info.value) == ('invalid input: output_format: must be one of "json", "zip" '
                               "(got the string 'csv')")
    assert request_for(data_url="https://example.com/a.jpg").output_format == "zip"
    assert schema.parse_request({"data_url": "https://example.com/a.jpg"},
                                config.defaults()).output_format == "json"


# --- whole jobs (tiny model) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def eng():
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0"})
    return engine_mod.load_engine(cfg)


def make_worker(eng, tmp_path, **env) -> jobs.Worker:
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0",
                                  "WORK_DIR": str(tmp_path / "work"), **env})
    return jobs.Worker(cfg, eng)


@pytest.fixture(scope="module")
def worker(eng, tmp_path_factory):
    w = make_worker(eng, tmp_path_factory.mktemp("zipjobs"))
    yield w
    w.close()


def nested_zip() -> bytes:
    """Folders, a stem collision, an unsafe name, a corrupt member and a text file."""
    data = make_zip([
        ("shots/a.jpg", pics.jpeg(seed=1)), ("shots/a.png", pics.png(seed=2)),
        ("shots/deep/b.webp", pics.image_bytes("WEBP", seed=3)),
        ("../../escape.jpg", pics.jpeg(seed=4)), ("shots/broken.jpg", pics.jpeg(seed=5)),
        ("notes.txt", b"not an image"),
    ])
    return corrupt_entry(data, "shots/broken.jpg")


def test_a_zip_gives_a_zip_of_captions_mirroring_its_folders(worker, caplog):
    caplog.set_level(logging.INFO)
    out = worker.run({"data_url": web.data_uri(nested_zip(), "application/zip"),
                      "output_format": "zip", **FAST}, "job-zip")
    files = inline_zip(out)
    caps = captions_by_path(out)
    assert files == {"escape.txt": caps["../../escape.jpg"][0] + "\n",
                     "shots/a.txt": caps["shots/a.jpg"][0] + "\n",
                     "shots/a.png.txt": caps["shots/a.png"][0] + "\n",
                     "shots/deep/b.txt": caps["shots/deep/b.webp"][0] + "\n"}
    assert [e["image_path"] for e in out["errors"]] == ["shots/broken.jpg"]  # and no file
    assert list(out)[-1] == "captions_zip" and out["skipped"] == 1
    assert out["captions_zip"][:200] not in caplog.text and "returned inline" in caplog.text


def test_several_sources_get_a_folder_per_zip_and_url_names(worker, http_server):
    zip_url = http_server.route("/sets/photos.zip", web.body(make_zip(
        [("x/one.jpg", pics.jpeg(seed=10)), ("two.png", pics.png(seed=11))])))
    cat_url = http_server.route("/img/cat%20pic.jpg", web.body(pics.jpeg(seed=12)))
    gone = http_server.route("/img/gone.jpg", web.status(404))
    inline = web.data_uri(make_zip([("three.jpg", pics.jpeg(seed=13))]))
    sources = [zip_url, cat_url + "?size=big", web.data_uri(pics.jpeg(seed=14)), gone,
               zip_url, inline]
    out = worker.run({"data_urls": sources, "output_format": "zip", **FAST}, "job-many")
    files = inline_zip(out)
    assert sorted(files) == ["cat pic.txt", "data_urls_2.txt", "data_urls_5/three.txt",
                             "photos-2/two.txt", "photos-2/x/one.txt", "photos/two.txt",
                             "photos/x/one.txt"]
    caps = captions_by_path(out)
    assert files["photos/x/one.txt"] == caps[f"{zip_url}/x/one.jpg"][0] + "\n"
    assert files["cat pic.txt"] == caps[sources[1]][0] + "\n"
    assert files["data_urls_5/three.txt"] == caps["data_urls[5]/three.jpg"][0] + "\n"
    assert [e["image_path"] for e in out["errors"]] == [gone]


def test_alternatives_follow_the_caption_one_per_line(worker):
    out = worker.run({"data_urls": [web.data_uri(pics.jpeg(seed=20))],
                      "output_format": "zip", "num_beams": 4, "num_captions": 3,
                      "max_length": 8, "include_prompt": True, "prompt": "a\nphoto of"}, "job-alt")
    (text,) = inline_zip(out).values()
    entry = out["captions"][0]
    assert lines(text) == [c.replace("\n", " ") for c in [entry["caption"],
                                                          *entry["alternatives"]]]
    assert len(lines(text)) == 3 and lines(text)[0].startswith("a photo of")


def test_json_stays_the_default(worker):
    out = worker.run({"data_url": web.data_uri(pics.jpeg(seed=21)), **FAST})
    assert not [k for k in out if k.startswith("captions_zip")]


# --- uploads to a real S3-compatible server --------------------------------------------------

def bucket_env(endpoint: str, bucket: str) -> dict[str, str]:
    return {"BUCKET_ENDPOINT_URL": endpoint, "BUCKET_ACCESS_KEY_ID": "test-key-id",
            "BUCKET_SECRET_ACCESS_KEY": SECRET, "BUCKET_NAME": bucket}


@pytest.fixture(scope="module")
def s3():
    with moto_bucket("captions", "test-key-id", SECRET) as server:
        yield server


def test_upload_returns_a_presigned_link_to_the_zip(eng, tmp_path, s3):
    endpoint, client = s3
    w = make_worker(eng, tmp_path, **bucket_env(endpoint, "captions"))
    try:
        out = w.run({"data_url": web.data_uri(nested_zip(), "application/zip"),
                     "output_format": "zip", **FAST}, "job-s3")
    finally:
        w.close()
    assert "captions_zip" not in out and "captions_zip_error" not in out
    got = requests.get(out["captions_zip_url"], timeout=10)
    assert got.status_code == 200, got.text[:300]
    files = read_zip(got.content)
    assert files["shots/a.png.txt"] == captions_by_path(out)["shots/a.png"][0] + "\n"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="captions")["Contents"]]
    assert "job-s3/captions.zip" in keys  # in BUCKET_NAME, not runpod's month-named default


@pytest.mark.parametrize("where", ["missing bucket", "nothing listening"])
def test_a_failed_upload_is_reported_and_the_captions_stay(s3, caplog, where):
    endpoint, _ = s3
    if where == "nothing listening":
        endpoint = f"http://127.0.0.1:{free_port()}"
    bucket = "no-such-bucket" if where == "missing bucket" else "captions"
    out = zip_fields(config.Config.from_env(bucket_env(endpoint, bucket)))
    message = out["captions_zip_error"]
    assert set(out) == {"captions_zip_error"} and bucket in message
    assert ("NoSuchBucket" if where == "missing bucket" else "connect") in message
    assert SECRET not in message and SECRET not in caplog.text


def test_upload_through_the_local_api(s3, tmp_path):
    endpoint, _ = s3
    uri = web.data_uri(make_zip([("d/p.jpg", pics.jpeg(seed=30))]))
    with ApiServer(tmp_path / "api.log", **bucket_env(endpoint, "captions")) as api:
        answer = api.runsync({"data_url": uri, "output_format": "zip", **FAST})
        log_text = api.output()
    assert answer["status"] == "COMPLETED", answer
    files = read_zip(requests.get(answer["output"]["captions_zip_url"], timeout=10).content)
    assert files == {"d/p.txt": answer["output"]["captions"][0]["caption"] + "\n"}
    assert SECRET not in log_text and "X-Amz-Signature" not in log_text


def test_caption_file_names_come_from_raw_member_names_not_display_labels():
    """A member name with a control character is escaped in image_path (one readable line)
    but its caption file is named from the raw name (control characters become "_")."""
    cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0"})
    w = jobs.Worker(cfg, engine_mod.load_engine(cfg))
    try:
        data = make_zip([("shots/a\x01b.jpg", pics.jpeg(seed=1))])
        out = w.run({"data_url": web.data_uri(data, "application/zip"), "output_format": "zip",
                     "num_beams": 1, "max_length": 5})
        assert out["captions"][0]["image_path"] == "shots/a\\x01b.jpg"
        names = zipfile.ZipFile(io.BytesIO(base64.b64decode(out["captions_zip"]))).namelist()
        assert names == ["shots/a_b.txt"]
    finally:
        w.close()
