"""The README says what the code does: its tables are generated from the code, every JSON
request in it runs through the real local API, its error example is the real message, and it
opens with the two commands CI runs."""
import json
import re

import pytest

import config
import schema
from support import web
from support import images as pics
from support.worker import REPO, ApiServer
from support.zips import make_zip

README = (REPO / "README.md").read_text()


def between(tag: str) -> str:
    m = re.search(rf"<!-- {tag}:[^\n]*-->\n(.*?)\n<!-- /{tag} -->", README, re.S)
    assert m, f"README has no {tag} block"
    return m.group(1)


def json_blocks() -> list[dict]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", README, re.S)]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_same_one():
    head = "\n".join(README.splitlines()[:40])
    assert "make run" in head and "make test" in head
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\s*$", ci, re.M), ".ci/run must call `make test`"


def test_input_table_is_generated_from_the_schema():
    assert between("input-table") == schema.markdown_table()


def test_environment_table_is_generated_from_the_config():
    assert between("env-table") == config.markdown_table()


def test_every_documented_field_and_setting_exists():
    documented = set(re.findall(r"^\| `(\w+)` \|", between("input-table"), re.M))
    assert documented == {f.name for f in schema.FIELDS}
    envs = set(re.findall(r"^\| `(\w+)` \|", between("env-table"), re.M))
    assert envs == {s.env for s in config.SETTINGS}


def test_the_error_example_is_the_real_message():
    example = next(b for b in json_blocks() if "error" in b)
    with pytest.raises(Exception) as info:
        schema.parse_request({"data_url": "https://example.com/cat.jpg", "num_beam": 3,
                              "max_length": "50"}, config.defaults())
    assert example["error"] == str(info.value)


def test_the_output_example_has_the_real_shape():
    example = next(b for b in json_blocks() if "captions" in b)
    assert set(example) <= {"captions", "errors", "skipped", "model", "engine", "timings"}
    assert set(example["captions"][0]) == {"image_path", "caption"}
    assert set(example["timings"]) == {"fetch_s", "caption_s", "total_s"}
    # its image error is what the worker says for a real truncated JPEG of that name
    import io

    from inputs import ImageSource, decode_image
    (entry,) = example["errors"]
    src = ImageSource((0, 0), entry["image_path"], lambda: io.BytesIO(pics.truncated_jpeg(1)))
    with pytest.raises(Exception) as info:
        decode_image(src, config.defaults())
    assert entry["error"] == str(info.value)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with ApiServer(tmp_path_factory.mktemp("docs") / "server.log") as server:
        yield server


def serve_example_urls(http_server, job_input: dict) -> dict:
    """Point every example.com URL at the local server: a zip for .zip, else an image."""
    def local(url: str) -> str:
        path = "/" + url.split("example.com/", 1)[1]
        if path.endswith(".zip"):
            data = make_zip([(f"shots/{i}.jpg", pics.jpeg(seed=60 + i))
                             for i in range(3)] + [("notes.txt", b"x")])
        else:
            data = pics.jpeg(seed=len(path))
        return http_server.route(path, web.body(data))

    out = dict(job_input)
    if "data_url" in out:
        out["data_url"] = local(out["data_url"])
    if "data_urls" in out:
        out["data_urls"] = [local(u) for u in out["data_urls"]]
    return out


def test_every_readme_request_runs(api, http_server):
    requests = [b["input"] for b in json_blocks() if "input" in b]
    assert len(requests) >= 3
    for job_input in requests:
        answer = api.runsync(serve_example_urls(http_server, job_input))
        assert answer["status"] == "COMPLETED", answer
        assert answer["output"]["captions"], answer


def test_the_readme_curl_input_is_valid():
    for raw in re.findall(r"-d '(\{.*?\})'", README) + re.findall(r"--test_input '(\{.*?\})'",
                                                                  README):
        schema.parse_request(json.loads(raw)["input"], config.defaults())
