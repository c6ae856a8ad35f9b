"""Hardening (issue 7): hostile archives, images, network faults and parameters, proven at the
job level (``jobs.Worker.run`` of a worker made by ``handler.setup``, as in production) and, for
a representative subset, through the real local API (``src/handler.py --rp_serve_api``); the
fault isolation of a failing job and of a corrupted GPU; a short form of the soak.

Both workers run with the same settings (``WORKER_ENV``): a 2 s download deadline, quick
retries and the prompt ``POISON`` simulating a corrupted CUDA context. The API server also runs
out of memory on every batch over 3 images (``API_CHAOS``); the in-process worker does not, as
each injected out-of-memory costs a garbage collection that would blur its latency measurements.
Every test ends with both work directories empty (``no_leftovers``). The expected messages are
the real ones, quoted whole where they do not depend on the machine.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from runpod.serverless.utils import rp_ssrf

import config
import handler
import schema
from support import checks, load, web
from support import images as pics
from support.worker import FAST, REPO, ApiServer, api_output, proc_figures
from support.zips import (JUNK_NAMES, ZIP_SLIP_NAMES, make_zip, many_members_zip, patch_entry,
                          symlink_entry, truncated, zip_bomb)

MiB = 1 << 20
DEADLINE_S = 2
POISON = "poison the gpu"
WORKER_ENV = {"BLIP_MODEL": "tiny-random", "DOWNLOAD_DEADLINE_S": str(DEADLINE_S),
              "DOWNLOAD_RETRY_BACKOFF_S": "0.01", "BLIP_INJECT_CUDA_ERROR_PROMPT": POISON}
API_CHAOS = {"BLIP_INJECT_OOM_ABOVE_BATCH": "3"}  # the API server runs out of memory too
LONG = 120  # text.short's limit: no input value longer than this may appear in an error


# --- the two workers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    return {"job": base / "job-work", "api": base / "api-work", "log": base / "server.log"}


@pytest.fixture(scope="module", autouse=True)
def _api_booting(work_dirs):
    """Start the API server at once, in the background: it loads while the first tests run."""
    server = ApiServer(work_dirs["log"], **WORKER_ENV, **API_CHAOS,
                       WORK_DIR=str(work_dirs["api"]))
    with ThreadPoolExecutor(1) as boot:
        booting = boot.submit(server.start)
        yield booting
        booting.exception()  # wait: never leave a half-started server behind
    server.stop()


@pytest.fixture(scope="module")
def api(_api_booting):
    return _api_booting.result()


@pytest.fixture(scope="module")
def worker(work_dirs):
    """The in-process worker, made by ``handler.setup`` (so ``handler.handler`` serves it)."""
    saved = handler.service
    cfg = config.Config.from_env({**WORKER_ENV, "BLIP_WARMUP": "0",
                                  "WORK_DIR": str(work_dirs["job"])})
    service = handler.setup(cfg)
    yield service.worker
    service.close()  # the worker, then its job threads
    handler.service = saved


@pytest.fixture(params=["job", "api"])
def run(request, worker):
    """Run one job input and answer in ``Worker.run``'s shape: in process, or through the API."""
    if request.param == "job":
        return lambda job_input: checks.within(60, worker.run, job_input)  # a hang fails the test
    api = request.getfixturevalue("api")
    return lambda job_input: api_output(api.runsync(job_input, timeout=60))


@pytest.fixture(autouse=True)
def no_leftovers(work_dirs):
    """After every test, no job directory is left in either worker's WORK_DIR."""
    yield
    for name in ("job", "api"):
        left = os.listdir(work_dirs[name]) if work_dirs[name].exists() else []
        assert left == [], f"{name} worker left {left} in its WORK_DIR"


def check(out: dict, expected: dict, skipped: int = 0) -> dict:
    """Assert the job's outcomes are exactly ``expected``; return {image_path: caption}."""
    assert "error" not in out, out["error"]
    assert checks.outcome_problems(out, expected) == []
    assert out.get("skipped", 0) == skipped
    return {c["image_path"]: c["caption"] for c in out["captions"]}


# --- images ----------------------------------------------------------------------------------

CAPTIONED = None
HOSTILE_IMAGES = {  # name: (bytes, CAPTIONED or the start of its error)
    "pixel-bomb.png": (pics.pixel_bomb_png(50000, 50000),
                       "image is 2500 MP; the limit is 120 MP (MAX_IMAGE_PIXELS); resize it"),
    "truncated.jpg": (pics.truncated_jpeg(1),
                      "not a readable image: truncated or corrupt JPEG data ("),
    "cmyk.jpg": (pics.cmyk_jpeg(1), CAPTIONED),
    "16-bit.png": (pics.png16(), CAPTIONED),
    "palette-transparent.png": (pics.palette_png_transparent(2), CAPTIONED),
    "animated.gif": (pics.animated("GIF"), CAPTIONED),
    "animated.webp": (pics.animated("WEBP"), CAPTIONED),
    "exif-rotated.jpg": (pics.exif_rotated_jpeg(1), CAPTIONED),
    "1x1.png": (pics.png(4, (1, 1)), CAPTIONED),
    "10000x10.png": (pics.png(5, (10000, 10)), CAPTIONED),
    "not-an-image.jpg": (b"plain text, not a picture", "not an image or a zip: the content is not "
                         "JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF, nor a zip of them"),
    "empty.jpg": (b"", "the file is empty (0 bytes); check that the source holds the image"),
}
# What the special images must caption as: the first frame; the image turned upright. And
# controls proving the captions tell them apart: the second frame; the stored, unturned pixels.
REFERENCES = {
    "ref/first-frame.png": pics.solid((255, 0, 0)), "ref/second-frame.png": pics.solid((0, 0, 255)),
    "ref/upright.png": pics.upright(HOSTILE_IMAGES["exif-rotated.jpg"][0]),
    "ref/unturned.png": pics.encode(Image.open(io.BytesIO(HOSTILE_IMAGES["exif-rotated.jpg"][0]))
                                    .convert("RGB"), "PNG"),
}


def assert_decoded_as_a_viewer_shows_them(caption) -> None:
    """``caption(name)``: the caption of that file in the job."""
    assert caption("animated.gif") == caption("animated.webp") == caption("ref/first-frame.png")
    assert caption("exif-rotated.jpg") == caption("ref/upright.png")
    # Controls: the model tells these apart (if a new tiny model does not, pick other images).
    assert caption("animated.gif") != caption("ref/second-frame.png")
    assert caption("exif-rotated.jpg") != caption("ref/unturned.png")


def test_hostile_images_by_url_each_get_their_outcome(run, http_server):
    files = {**{n: d for n, (d, _) in HOSTILE_IMAGES.items()}, **REFERENCES}
    urls = {name: http_server.route(f"/img/{name}", web.body(data)) for name, data in files.items()}
    out = run({"data_urls": list(urls.values()), **FAST})
    captions = check(out, {urls[n]: HOSTILE_IMAGES.get(n, (b"", CAPTIONED))[1] for n in files})
    assert_decoded_as_a_viewer_shows_them(lambda name: captions[urls[name]])


# --- archives --------------------------------------------------------------------------------

def hostile_zip() -> tuple[bytes, dict, int]:
    """Every hostile member kind in one zip: (bytes, expected outcomes, members skipped)."""
    entries = [(name, pics.png(10 + i)) for i, name in enumerate(ZIP_SLIP_NAMES)]
    entries += [symlink_entry("link.jpg"), ("locked.jpg", pics.jpeg(20)),
                ("inner.zip", make_zip([("a.png", pics.png(21))])),
                ("zip-named.jpg", make_zip([("b.png", pics.png(22))])),
                ("png-named.zip", pics.png(23)), ("new\nline.jpg", pics.png(24)),
                ("\u202eevil.jpg", pics.png(25))]
    entries += [(f"images/{name}", data) for name, (data, _) in HOSTILE_IMAGES.items()]
    entries += [(f"images/{name}", data) for name, data in REFERENCES.items()]
    entries += [(name, b"junk") for name in JUNK_NAMES]
    nested = "a zip inside the zip is not opened; zip the images themselves"
    expected = {**{name: CAPTIONED for name in ZIP_SLIP_NAMES},
                "link.jpg": "symbolic link in the zip: links are not followed; put the image "
                            "itself in the zip",
                "locked.jpg": "encrypted (password-protected) zip member; zip the images "
                              "without a password",
                "inner.zip": nested, "zip-named.jpg": nested, "png-named.zip": CAPTIONED,
                "new\\nline.jpg": CAPTIONED, "\\u202eevil.jpg": CAPTIONED,  # escaped labels
                **{f"images/{n}": want for n, (_, want) in HOSTILE_IMAGES.items()},
                **{f"images/{n}": CAPTIONED for n in REFERENCES}}
    data = patch_entry(make_zip(entries), "locked.jpg", flag_bits=1)
    return data, expected, len(JUNK_NAMES)


def test_hostile_zip_members_each_get_their_outcome_and_nothing_escapes(run, work_dirs):
    repo_before = set(os.listdir(REPO))
    data, expected, skipped = hostile_zip()
    out = run({"data_url": web.data_uri(data, "application/zip"), **FAST})
    captions = check(out, expected, skipped)
    assert_decoded_as_a_viewer_shows_them(lambda name: captions[f"images/{name}"])
    assert set(os.listdir(REPO)) == repo_before  # both workers run in the repository root
    for root in (work_dirs["job"], work_dirs["api"], REPO):  # where ../../x.jpg would land
        assert not any((root / rel).resolve().exists()
                       for rel in ("x.jpg", "../x.jpg", "../../x.jpg", "../../../x.jpg"))
    assert not os.path.exists("/abs/x.jpg") and not os.path.exists("/x.jpg")


def _huge_total_zip() -> bytes:
    """Two members whose headers claim 3.75 GiB each (over 4 GiB together, ratio checked later)."""
    data = make_zip([("a.png", pics.png(1)), ("b.png", pics.png(2))])
    for name in ("a.png", "b.png"):
        data = patch_entry(data, name, file_size=0xF0000000)
    return data


BOMB = ("zip member 'zeros.jpg' expands ", "x (", " to 50 MiB); the limit is 100x (MAX_ZIP_RATIO): "
        "this looks like a zip bomb; zip the images with ordinary compression")  # the ratio
ZIP_JOB_ERRORS = {  # job input factory (data: URIs) -> the whole job's error, in pieces
    "bomb": (lambda: {"data_url": web.data_uri(zip_bomb())}, ("data_url: " + BOMB[0], *BOMB[1:])),
    "bomb-among-images": (lambda: {"data_urls": [web.data_uri(pics.png(1)),
                                                 web.data_uri(zip_bomb())]},
                          ("data_urls[1]: " + BOMB[0], *BOMB[1:])),
    "huge-total": (lambda: {"data_url": web.data_uri(_huge_total_zip())},
                   ("data_url: the zip's files total 7.5 GiB uncompressed; the limit is 4 GiB "
                    "(MAX_ZIP_UNCOMPRESSED_BYTES); split it into several jobs",)),
    "10000-members": (lambda: {"data_url": web.data_uri(many_members_zip(10_000))},
                      ("data_url: the zip has 10000 files; the limit is 1000 "
                       "(MAX_IMAGES_PER_JOB); split it into several jobs",)),
    "truncated": (lambda: {"data_url": web.data_uri(truncated(make_zip(
                      [(f"{i}.png", pics.png(i)) for i in range(4)])))},
                  ("data_url: unreadable zip archive (File is not a zip file); the file may be "
                   "truncated or damaged: create it again",)),
    "no-images": (lambda: {"data_url": web.data_uri(make_zip([("a.txt", b"x"),
                                                               ("__MACOSX/._a.jpg", b"x")]))},
                  ("no images found to caption (2 non-image files were skipped): send JPEG, "
                   "PNG, GIF, WebP, BMP, TIFF or AVIF images, or a zip of them",)),
}


@pytest.mark.parametrize("case", ZIP_JOB_ERRORS)
def test_zips_over_their_limits_fail_the_job_at_once(run, case):
    make, pieces = ZIP_JOB_ERRORS[case]
    job = {**make(), **FAST}
    start = time.monotonic()
    out = run(job)
    assert time.monotonic() - start < 2  # from the central directory: nothing is inflated
    assert set(out) == {"error"} and out["error"].startswith(pieces[0]), out
    rest = out["error"][len(pieces[0]):]
    for piece in pieces[1:]:  # the other pieces follow, in order
        assert piece in rest, (piece, out["error"])
        rest = rest[rest.index(piece) + len(piece):]


def test_ten_thousand_junk_members_are_counted_and_the_image_captioned(worker):
    data = make_zip([(f"__MACOSX/._{i:05d}.jpg", b"x") for i in range(10_000)]
                    + [("photo.png", pics.png(1))])
    out = worker.run({"data_url": web.data_uri(data), **FAST})
    check(out, {"photo.png": CAPTIONED}, skipped=10_000)


def test_a_truncated_zip_among_other_sources_costs_only_itself(worker):
    cut = web.data_uri(truncated(make_zip([(f"{i}.png", pics.png(i)) for i in range(4)])))
    out = worker.run({"data_urls": [cut, web.data_uri(pics.png(9))], **FAST})
    check(out, {"data_urls[0]": "unreadable zip archive (File is not a zip file); the file may "
                                "be truncated or damaged: create it again",
                "data_urls[1]": CAPTIONED})


# --- network ---------------------------------------------------------------------------------

TOO_LARGE = "the image is larger than 50 MiB (MAX_IMAGE_BYTES); send a smaller image"


def network_faults() -> dict:
    """{path: (route, CAPTIONED or the start of its error)}; new routes each call (some count
    their requests)."""
    deadline = f"the download did not finish within {DEADLINE_S} s (DOWNLOAD_DEADLINE_S)"
    return {
        "/404.jpg": (web.status(404), "the server answered HTTP 404 Not Found; check that the URL "
                                      "is correct and publicly readable (no login, not expired)"),
        "/500-then-ok.jpg": (web.fail_then(1, web.body(pics.jpeg(30))), CAPTIONED),
        "/drip.jpg": (web.drip(b"\xff\xd8\xff" + bytes(200), interval=0.2), deadline),
        "/drip-headers.jpg": (web.drip_headers(interval=0.2), deadline),
        "/slow-redirects.jpg": (web.delay(0.6, web.redirect("/slow-redirects.jpg")), deadline),
        "/reset.jpg": (web.reset(), "download failed after 4 attempts: the server closed the "
                                    "connection without answering"),
        "/loop.jpg": (web.redirect("/loop.jpg"),
                      "too many redirects (more than 5); use the final URL"),
        "/huge.jpg": (web.huge(200 * MiB, head=b"\xff\xd8\xff\xe0"), TOO_LARGE),
        "/length-short.jpg": (web.body(pics.jpeg(31, (256, 192)), length=100),
                              "not a readable image: truncated or corrupt JPEG data ("),
        "/length-long.jpg": (web.body(pics.jpeg(32), length=10_000),
                             "download failed after 4 attempts: the connection broke during the "
                             "download"),
        "/length-3GiB.jpg": (web.body(pics.jpeg(33), length=3 << 30),
                             "the file is 3 GiB (its Content-Length); the limits are 50 MiB for an "
                             "image (MAX_IMAGE_BYTES) and 2 GiB for a zip (MAX_ZIP_BYTES)"),
        "/really-a-png.zip": (web.body(pics.png(34), "application/zip"), CAPTIONED),
        "/really-a-zip.jpg": (web.body(make_zip([("inside.png", pics.png(35))]), "image/jpeg"),
                              CAPTIONED),  # its member, labelled "<url>/inside.png"
    }


def test_network_faults_each_get_their_outcome_within_the_deadline(run, http_server):
    faults = network_faults()
    urls = {path: http_server.route(path, route) for path, (route, _) in faults.items()}
    expected = {urls[p]: want for p, (_, want) in faults.items()}
    expected[urls["/really-a-zip.jpg"] + "/inside.png"] = expected.pop(urls["/really-a-zip.jpg"])
    start = time.monotonic()
    out = run({"data_urls": list(urls.values()), **FAST})
    elapsed = time.monotonic() - start
    check(out, expected)
    assert http_server.hits("/500-then-ok.jpg") == 2  # retried once
    assert http_server.hits("/reset.jpg") == 4 and http_server.hits("/404.jpg") == 1
    assert http_server.hits("/loop.jpg") == 6  # the first request and 5 redirects
    assert elapsed < DEADLINE_S + 2.5, elapsed  # every source is fetched concurrently


def test_a_failing_job_cuts_its_other_downloads_at_once(worker, http_server):
    """A job error (a zip bomb) while another source still waits for its headers: the job
    answers at once; the waiting download is cut, not awaited until its deadline."""
    job = {"data_urls": [http_server.route("/drip-headers.jpg", web.drip_headers(interval=0.2)),
                         web.data_uri(zip_bomb())], **FAST}
    start = time.monotonic()
    out = worker.run(job)
    assert out["error"].startswith("data_urls[1]: " + BOMB[0])
    assert time.monotonic() - start < DEADLINE_S / 2


def test_a_body_over_the_cap_is_read_up_to_the_cap_and_no_further(worker, http_server,
                                                                   monkeypatch):
    import urllib3
    reads = web.count_bytes_returned(monkeypatch, urllib3.response.HTTPResponse, "read1")
    cap = worker.cfg.max_image_bytes
    url = http_server.route("/huge.jpg", web.huge(200 * MiB, head=b"\xff\xd8\xff\xe0"))
    out = worker.run({"data_urls": [url, web.data_uri(pics.png(1))], **FAST})
    check(out, {url: TOO_LARGE, "data_urls[1]": CAPTIONED})
    assert sum(reads) == cap + 1  # one byte past the cap proves it is exceeded
    assert http_server.sent("/huge.jpg") < cap + 32 * MiB  # the rest was never sent


def test_private_addresses_are_refused_unless_allowed(worker, http_server, monkeypatch):
    # A second server on 127.0.0.2 plays a public host (the SSRF guard's address test is
    # replaced by "only 127.0.0.2 is public"); everything else is real: its redirects are
    # answered over HTTP and runpod's guard re-checks every hop.
    monkeypatch.delenv(web.PRIVATE_ENV)
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.2")
    target = http_server.route("/private.jpg", web.body(pics.jpeg(40)))
    with web.LocalServer("127.0.0.2") as public:
        public.route("/to-local", web.redirect(target))
        public.route("/to-metadata", web.redirect("http://169.254.169.254/latest/meta-data/"))
        public.route("/fine.jpg", web.body(pics.jpeg(41)))
        sources = [target] + [public.url(path, "127.0.0.2")
                              for path in ("/to-local", "/to-metadata", "/fine.jpg")]
        out = worker.run({"data_urls": sources, **FAST})
        check(out, {sources[0]: "refused: '127.0.0.1' resolves to a non-public address "
                                "(127.0.0.1); only public http(s) URLs can be downloaded",
                    sources[1]: "refused: '127.0.0.1' resolves to a non-public address",
                    sources[2]: "refused: '169.254.169.254' resolves to a non-public address "
                                "(169.254.169.254)",
                    sources[3]: CAPTIONED})
        assert http_server.hits("/private.jpg") == 0 and public.hits("/to-local") == 1
        monkeypatch.setenv(web.PRIVATE_ENV, "true")  # the operator allows private addresses
        out = worker.run({"data_url": sources[1], **FAST})
        check(out, {sources[1]: CAPTIONED})
        assert http_server.hits("/private.jpg") == 1


# --- parameters: fuzzing the whole input through the handler ---------------------------------

def _json_values():
    """Any JSON value: nested lists and objects of any leaves, huge strings and integers."""
    leaves = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 80, 2 ** 80)
              | st.floats() | st.text(max_size=12)
              | st.sampled_from(["x" * 500, "é" * 100_000, "\x00\n"]))
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=3)
                        | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)


def _near_bounds(spec: schema.FieldSpec):
    """Values at and around a field's bounds, of its own type and of neighbouring ones."""
    lo, hi = spec.lo if spec.lo is not None else 0, spec.hi if spec.hi is not None else 1
    if spec.kind in ("int", "opt_int"):
        return st.integers(int(lo) - 2, int(hi) + 2) | st.sampled_from([lo, hi, float(hi),
                                                                         str(int(lo))])
    if spec.kind == "float":
        return st.floats(lo - 1, hi + 1) | st.sampled_from([lo, hi, int(hi), float("nan"),
                                                           float("inf"), True])
    if spec.kind == "str":
        return st.text(max_size=int(hi) + 3) | st.sampled_from(["", "</s>", "<image>" * 50])
    if spec.kind == "choice":
        return st.sampled_from(spec.choices) | st.text(max_size=8)
    return st.booleans() | st.sampled_from([0, 1, "true"])


def _valid(spec: schema.FieldSpec):
    """Values a field accepts on its own (rules across fields may still refuse them)."""
    if spec.kind in ("int", "opt_int"):
        return st.integers(int(spec.lo), int(spec.hi))
    if spec.kind == "float":
        return st.floats(spec.lo, spec.hi, exclude_min=spec.lo_open)
    if spec.kind == "str":
        return st.text(max_size=int(spec.hi))
    if spec.kind == "choice":
        return st.sampled_from(spec.choices)
    return st.booleans()


ODD_TEXT = st.text(st.sampled_from(["a", "/", "?", "%", "#", "\\", " ", "é", "\n", "\x00",
                                     "\ud800", "\u202e", "\u2028"]), max_size=12)


def _inputs(sources: list[str], good: list[str], base_url: str):
    """Whole job inputs: any JSON value; objects of every field (at, around and far from its
    bounds, of any type) and unknown keys; and objects of sources and valid fields, which run.
    Sources: good and bad ones, text, and local URLs (404) with odd characters."""
    source = (st.sampled_from(sources) | st.text(max_size=30)
              | st.builds(lambda tail: base_url + tail, ODD_TEXT))
    fields = {}
    for spec in schema.FIELDS:
        if spec.kind == "url":
            fields[spec.name] = source | _json_values()
        elif spec.kind == "urls":
            fields[spec.name] = (st.lists(source, min_size=1, max_size=3) | _json_values()
                                 | st.just(["ftp://x"] * 1001))
        else:
            fields[spec.name] = _near_bounds(spec) | _json_values()
    unknown = st.dictionaries(st.sampled_from(["num_beam", "tempreature", "x" * 300, "", "\x07",
                                               "dataurl"]) | st.text(max_size=10),
                              _json_values(), max_size=2)
    job = st.builds(lambda known, extra: {**extra, **known},
                    st.fixed_dictionaries({}, optional=fields), unknown)
    fine = {spec.name: _valid(spec) for spec in schema.FIELDS if spec.kind not in ("url", "urls")}
    runs = (st.fixed_dictionaries({"data_url": st.sampled_from(good) | source}, optional=fine)
            | st.fixed_dictionaries({"data_urls": st.lists(st.sampled_from(good) | source,
                                                           min_size=1, max_size=3)},
                                    optional=fine))
    return job | runs | _json_values()


def _strings(value) -> list[str]:
    """Every string inside a JSON value, keys included (iterative: inputs nest deeply)."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return found


def assert_readable_answer(job_input, out) -> None:
    """A result or a readable error: JSON that encodes as UTF-8 (as runpod sends it), no
    internal error, one printable line, no long input value echoed."""
    text = json.dumps(out, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert isinstance(out, dict) and ("captions" in out) != ("error" in out), text[:500]
    labels = [e["image_path"] for e in out.get("captions", []) + out.get("errors", [])]
    assert all(label.isprintable() for label in labels), labels
    if "error" in out:
        error = out["error"]
        assert isinstance(error, str) and 0 < len(error) <= 4000, error[:500]
        assert "internal error" not in error and "Traceback" not in error, error
        assert error.isprintable(), error
        for s in _strings(job_input):
            assert len(s) <= LONG or s[:LONG + 1] not in error, (s[:60], error)


def offline(monkeypatch) -> None:
    """Name lookups other than of 127.0.0.1 fail at once (hermetic: generated host names
    never reach a DNS server)."""
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host not in ("127.0.0.1", b"127.0.0.1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)


def test_handler_answers_any_input_readably(worker, http_server, monkeypatch):
    offline(monkeypatch)
    ok = http_server.route("/ok.jpg", web.body(pics.jpeg(50, (16, 16))))
    good = [ok, web.data_uri(pics.png(51, (16, 16))),
            web.data_uri(make_zip([("a.png", pics.png(52, (16, 16)))]))]
    sources = good + [http_server.url("/gone.jpg"), "ftp://example.com/a.jpg", "", "data:,",
                      "data:image/png;base64,!!!", "http://", "http://[::1", "/etc/passwd",
                      "http://\ud800.example/x.jpg", "http://exa\x00mple/x.jpg",
                      ok + "?" + "q" * 9000, "http://" + "h" * 300 + ".example/x.jpg"]
    seen = {"captions": 0, "error": 0}

    @settings(max_examples=100, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(job_input=_inputs(sources, good, http_server.url("/fuzz/")))
    def fuzz(job_input):
        out = asyncio.run(handler.handler({"id": "fuzz", "input": job_input}))
        assert_readable_answer(job_input, out)
        seen["captions" if "captions" in out else "error"] += 1

    fuzz()
    assert seen["captions"] >= 5 and seen["error"] >= 50, seen  # both paths were exercised


def test_the_smallest_temperatures_still_caption(worker):
    out = worker.run({"data_url": web.data_uri(pics.png(1)), "use_nucleus_sampling": True,
                      "temperature": 1e-300, **FAST})
    assert "captions" in out, out


def test_handler_survives_deep_nesting_huge_values_and_odd_jobs(worker):
    deep: list = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    huge = "x" * 5_000_000
    inputs = [{"data_urls": deep, "prompt": deep, "num_beams": {"a": deep}, "extra": deep},
              {"data_url": huge, "prompt": huge, huge: huge},
              {"data_url": "data:image/png;base64," + "A" * 4_000_000},
              {"data_urls": ["http://example.com/a.jpg"] * 100_000}]
    for job_input in inputs:
        out = asyncio.run(handler.handler({"id": "odd", "input": job_input}))
        assert_readable_answer(job_input, out)
        assert "error" in out
    for job in ({}, {"id": None}, {"input": None}, {"id": "x", "input": []}):
        assert "error" in asyncio.run(handler.handler(job))


# --- fault isolation -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool_captions(worker):
    """Each pool image's caption alone, in process (12 images)."""
    return load.pool_captions(worker.run, FAST, pool=12)


def test_a_job_whose_downloads_all_fail_does_not_slow_its_neighbours(worker, http_server,
                                                                     pool_captions):
    """Two clients send small jobs, first alone, then while two other clients send, back to
    back, jobs whose every download fails (404s, and a drip cut at the deadline). Bound: the
    neighbours' answers are identical, none waits for a failing download (none takes half the
    deadline longer than alone) and their median latency at most doubles (+0.25 s of
    scheduling noise on two cores)."""
    mix = load.LoadMix(http_server, FAST, seed=3, prefix="neighbours", pool=12, drip=True)
    neighbours = mix.jobs(12, kinds=("url", "inline", "list"))
    alone, beside, failed = load.load_beside_failures(worker.run, mix, neighbours, clients=2,
                                                      failing_clients=2)
    assert load.load_problems(alone + beside + failed, pool_captions) == []
    assert len(failed) >= 2 and all("DOWNLOAD_DEADLINE_S" in out["error"] for _, out, _ in failed)
    before = statistics.median(s for _, _, s in alone)
    after = statistics.median(s for _, _, s in beside)
    assert load.slowed(alone, beside, by=DEADLINE_S / 2) == []
    assert after <= 2 * before + 0.25, (before, after)


def test_a_corrupted_gpu_fails_its_job_asking_for_a_new_worker_and_others_finish(
        worker, http_server, pool_captions):
    mix = load.LoadMix(http_server, FAST, seed=5, prefix="cuda", pool=12, poison=POISON)
    jobs = mix.jobs(12, kinds=("url", "list", "zip")) + mix.jobs(3, kinds=("poison",))
    mix.rng.shuffle(jobs)
    results = load.run_load(worker.run, jobs, clients=3)
    assert load.load_problems(results, pool_captions) == []
    for job, out, _ in results:
        assert out.get("refresh_worker") is (True if job.fails else None), out
        if job.fails:
            assert out["error"] == (
                "the GPU failed while captioning (CUDA error: an illegal memory access was "
                "encountered (injected: BLIP_INJECT_CUDA_ERROR_PROMPT)); this worker will be "
                "replaced, please retry the job")
    assert worker.run({"data_url": mix.pool_uris[0], **FAST})["captions"]  # still working


# --- a short soak through the API ------------------------------------------------------------

def test_short_soak_through_the_api(api, http_server, work_dirs):
    """2 clients x 20 mixed jobs (zips with bad members, 404s, a drip, poisoned jobs) on the
    API server, out-of-memory injected: every answer exact; threads and descriptors as before."""
    run = lambda job_input: api_output(api.runsync(job_input))  # noqa: E731
    captions = load.pool_captions(run, FAST, pool=12)
    mix = load.LoadMix(http_server, FAST, seed=11, prefix="short", pool=12, drip=True,
                       poison=POISON)
    assert load.load_problems(load.run_load(run, mix.jobs(4), clients=2), captions) == []  # warm
    before = proc_figures(api.proc.pid)
    jobs = mix.jobs(18) + mix.jobs(2, kinds=("poison",))
    mix.rng.shuffle(jobs)
    results = load.run_load(run, jobs, clients=2)
    after = proc_figures(api.proc.pid)
    assert load.load_problems(results, captions) == []
    assert sum(job.images for job in jobs) >= 60
    assert os.listdir(work_dirs["api"]) == []
    assert after["threads"] <= before["threads"] + 2, (before, after)
    assert after["fds"] <= before["fds"] + 3, (before, after)
    assert "out of memory at batch" in api.output()  # the chaos really happened
