"""The request schema: defaults, bounds, strict types, cross-field rules, readable errors.

The bounds below are written out from the spec on purpose (not read from ``schema.FIELDS``), so
a wrong bound in FIELDS fails here.
"""
from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import config
import schema
from errors import JobError
from params import DEFAULT_PROMPT, GenerationParams
from schema import FIELDS, parse_request

CFG = config.defaults()
URL = "https://example.com/photo.jpg"
BIG = "A" * 1_000_000


def ok(**fields):
    return parse_request({"data_url": URL, **fields}, CFG)


def error(raw, cfg=CFG) -> str:
    with pytest.raises(JobError) as info:
        parse_request(raw, cfg)
    message = info.value.message
    assert message.startswith("invalid input: ")
    assert "input_value" not in message and "validation error" not in message.lower()
    return message


def bad(**fields) -> str:
    return error({"data_url": URL, **fields})


# --- defaults and the built objects ----------------------------------------------------------

def test_defaults():
    req = ok()
    assert req.sources == [URL] and req.single is True
    assert req.batch_size is None
    assert req.prompt == DEFAULT_PROMPT == "a photo of"
    assert req.include_prompt is False
    assert req.generation == GenerationParams()
    assert (req.num_beams, req.max_length, req.min_length, req.num_captions) == (3, 50, 5, 1)
    assert (req.top_p, req.temperature, req.repetition_penalty, req.length_penalty) == \
        (0.9, 1.0, 1.0, 1.0)
    assert req.use_nucleus_sampling is False


def test_data_urls_give_sources_in_order():
    urls = [URL, "http://example.org/b.png", "data:image/png;base64,AAAA"]
    req = parse_request({"data_urls": urls}, CFG)
    assert req.sources == urls and req.single is False


def test_generation_is_built_from_the_request():
    req = ok(num_beams=5, max_length=30, min_length=2, use_nucleus_sampling=True, top_p=0.5,
             temperature=0.7, repetition_penalty=1.5, length_penalty=-1, num_captions=7,
             batch_size=16, prompt="", include_prompt=True)
    # sampling ignores num_beams and length_penalty: normalised to 1 and the default
    assert req.generation == GenerationParams(1, 30, 2, True, 0.5, 0.7, 1.5, 1.0, 7)
    beams = ok(num_beams=5, max_length=30, min_length=2, length_penalty=-1, num_captions=3,
               repetition_penalty=1.5)
    assert beams.generation == GenerationParams(5, 30, 2, False, 0.9, 1.0, 1.5, -1.0, 3)
    assert (req.batch_size, req.prompt, req.include_prompt) == (16, "", True)


def test_fields_take_generation_defaults_from_params():
    defaults = {s.name: s.default for s in FIELDS}
    for f in dataclasses.fields(GenerationParams):
        assert defaults[f.name] == f.default, f.name
    assert defaults["prompt"] == DEFAULT_PROMPT


def test_fields_describe_every_model_field():
    assert [s.name for s in FIELDS] == list(schema.CaptionRequest.model_fields)
    for s in FIELDS:
        assert s.doc and s.type_text and s.default_text
    table = schema.markdown_table()
    for s in FIELDS:
        assert f"| `{s.name}` | {s.type_text} |" in table
    assert "| `num_beams` | integer | `3` | 1..10 |" in table
    assert "| `top_p` | number | `0.9` | (0, 1] |" in table
    assert "| `prompt` | string | `\"a photo of\"` | ≤ 300 characters |" in table


# --- bounds ----------------------------------------------------------------------------------

BOUNDS = [  # name, accepted, rejected (from the spec)
    ("batch_size", [1, 256, None], [0, 257, -1]),
    ("num_beams", [1, 10], [0, 11]),
    ("max_length", [1, 200], [0, 201]),
    ("min_length", [0, 50], [-1, 201]),
    ("top_p", [1e-9, 1, 1.0, 0.5], [0, 0.0, -0.1, 1.0001]),
    ("temperature", [1e-9, 5, 5.0], [0, -1, 5.01]),
    ("repetition_penalty", [1, 5, 2.5], [0.99, 5.01]),
    ("length_penalty", [-5, 5, 0], [-5.01, 5.01]),
    ("num_captions", [1, 3], [0, 11]),
]


COMPANIONS = {"max_length": {"min_length": 0}}  # keep the cross-field rules satisfied


@pytest.mark.parametrize("name,good,rejected", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_each_bound(name, good, rejected):
    for value in good:
        assert getattr(ok(**{name: value, **COMPANIONS.get(name, {})}), name) == value
    for value in rejected:
        message = bad(**{name: value})
        assert message.startswith(f"invalid input: {name}: must be "), message
        assert f"(got {value!r})" in message


def test_num_captions_up_to_ten_with_enough_beams():
    assert ok(num_captions=10, num_beams=10).num_captions == 10


def test_prompt_length():
    assert ok(prompt="x" * 300).prompt == "x" * 300
    assert "prompt: must be a string of at most 300 characters (got a string of 301 characters)" \
        in bad(prompt="x" * 301)


def test_bound_messages_say_the_range():
    assert "num_beams: must be an integer from 1 to 10 (got 11)" in bad(num_beams=11)
    assert "top_p: must be a number above 0 and at most 1 (got 0)" in bad(top_p=0)
    assert "length_penalty: must be a number from -5 to 5 (got 6)" in bad(length_penalty=6)
    assert "batch_size: must be an integer from 1 to 256, or null (got 0)" in bad(batch_size=0)


# --- strict types ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,value,shown", [
    ("num_beams", "3", "the string '3'"),
    ("num_beams", True, "true"),
    ("num_beams", 3.0, "3.0"),
    ("num_beams", None, "null"),
    ("max_length", [50], "a list of 1 item"),
    ("batch_size", 8.0, "8.0"),
    ("batch_size", "8", "the string '8'"),
    ("top_p", True, "true"),
    ("top_p", "0.5", "the string '0.5'"),
    ("temperature", float("nan"), "nan"),
    ("temperature", float("inf"), "inf"),
    ("use_nucleus_sampling", 1, "1"),
    ("use_nucleus_sampling", "true", "the string 'true'"),
    ("include_prompt", None, "null"),
    ("prompt", 5, "5"),
    ("prompt", {"text": "x"}, "an object"),
    ("data_url", 5, "5"),
    ("data_urls", URL, "the string"),
])
def test_strict_types(name, value, shown):
    raw = {"data_url": URL, name: value} if name not in ("data_url", "data_urls") else {name: value}
    message = error(raw)
    assert f"{name}: must be " in message and f"(got {shown}" in message, message


def test_numbers_accept_integers():
    req = ok(top_p=1, temperature=2, repetition_penalty=3, length_penalty=-5)
    assert (req.top_p, req.temperature, req.repetition_penalty, req.length_penalty) == \
        (1, 2, 3, -5)
    assert isinstance(req.generation.top_p, float)


def test_null_means_not_given_only_where_the_default_is_null():
    assert ok(batch_size=None).batch_size is None
    assert parse_request({"data_url": None, "data_urls": [URL]}, CFG).sources == [URL]
    assert parse_request({"data_url": URL, "data_urls": None}, CFG).single


# --- sources ---------------------------------------------------------------------------------

def test_exactly_one_source():
    assert "data_url: required" in error({})
    assert "data_url: required" in error({"num_beams": 3})
    assert "give only one of them" in error({"data_url": URL, "data_urls": [URL]})


def test_data_urls_count_bounds():
    assert "data_urls: must be a list of 1 to 1000 strings" in error({"data_urls": []})
    small = CFG.replace(max_images_per_job=3)
    assert len(parse_request({"data_urls": [URL] * 3}, small).sources) == 3
    message = error({"data_urls": [URL] * 4}, small)
    assert "data_urls: must be a list of 1 to 3 strings" in message
    assert "a list of 4 items" in message and "MAX_IMAGES_PER_JOB" in message


@pytest.mark.parametrize("source,why", [
    ("file:///etc/passwd", "the file: scheme is not allowed"),
    ("ftp://example.com/a.jpg", "the ftp: scheme is not allowed"),
    ("s3://bucket/a.jpg", "the s3: scheme is not allowed"),
    ("/tmp/photo.jpg", "not a URL"),
    ("photo.jpg", "not a URL"),
    ("C:\\photos\\a.jpg", "not a URL"),
    ("http:///a.jpg", "the URL has no host"),
    ("http://host:99999/a.jpg", "not a valid URL"),
    ("data:image/png,abc", "only base64 data: URIs"),
    ("data:image/png;base64", "a data: URI needs a comma"),
    ("https://example.com/" + "a" * 9000, "the URL is 9020 characters long; the limit is 8192"),
])
def test_source_forms_are_checked_naming_the_field(source, why):
    single = error({"data_url": source})
    assert single.startswith("invalid input: data_url: ") and why in single
    assert "http(s) URL or a base64 data: URI" in single
    several = error({"data_urls": [URL, URL, URL, source]})
    assert f"data_urls[3]: {why}" in several and "data_urls: each item must be" in several


def test_allowed_source_forms():
    for source in ("http://example.com/a.jpg", "HTTPS://example.com/a", "data:;base64,AAAA",
                   "DATA:image/jpeg;BASE64,/9j/", "https://[::1]:8080/x.zip"):
        assert parse_request({"data_url": source}, CFG).sources == [source]


# --- cross-field rules -----------------------------------------------------------------------

def test_min_length_at_most_max_length():
    assert ok(min_length=50, max_length=50).min_length == 50
    message = bad(min_length=51, max_length=50)
    assert "min_length: must be at most max_length (got min_length 51 with max_length 50)" \
        in message
    assert "min_length" in bad(min_length=60)  # against the default max_length of 50


def test_num_captions_at_most_num_beams_unless_sampling():
    assert ok(num_captions=3, num_beams=3).num_captions == 3
    message = bad(num_captions=4, num_beams=3)
    assert "num_captions: must be at most num_beams (3) unless use_nucleus_sampling" in message
    assert ok(num_captions=4, num_beams=1, use_nucleus_sampling=True).num_captions == 4
    assert ok(num_captions=2).num_captions == 2
    assert "num_captions: must be at most num_beams (3)" in bad(num_captions=4)  # default beams


def test_rules_skip_fields_that_are_already_wrong():
    message = bad(min_length="5", max_length=3)
    assert "min_length: must be an integer" in message
    assert "must be at most max_length" not in message


# --- unknown keys ----------------------------------------------------------------------------

def test_unknown_key_suggests_the_close_one():
    message = bad(num_beam=3)
    assert "num_beam: unknown parameter; did you mean num_beams?" in message
    assert "did you mean top_p?" in bad(topp=0.5)
    assert "did you mean data_urls?" in error({"data_url": URL, "data_url_list": [URL]})


def test_unknown_key_without_a_close_match_lists_the_parameters():
    message = bad(colour="red")
    assert "colour: unknown parameter;" in message
    assert "the parameters are data_url, data_urls, batch_size" in message


# --- the message -----------------------------------------------------------------------------

def test_message_lists_every_problem():
    message = error({"data_urls": ["ftp://x/y.jpg", 7], "num_beams": "3", "top_p": 2,
                     "prompt": None, "num_beam": 1, "min_length": 99})
    for part in ("data_urls[1]: must be", "num_beams: must be an integer", "top_p: must be",
                 "prompt: must be a string", "num_beam: unknown parameter",
                 "min_length: must be at most max_length"):
        assert part in message, part
    assert message.count("; ") >= 5


def test_many_problems_are_counted_not_all_listed():
    message = bad(**{f"junk{i}": i for i in range(100)})
    assert message.count("unknown parameter") == schema.MAX_PROBLEMS
    assert "... and 81 more problems" in message  # 100 keys + the parameter list
    assert len(message) < 3000


@pytest.mark.parametrize("raw", [
    {"data_url": URL, "prompt": BIG},
    {"data_url": "ftp://" + BIG},
    {"data_url": "data:image/png," + BIG},
    {"data_urls": [URL, "ftp://" + BIG, 5]},
    {"data_url": URL, BIG: 1},
    {"data_url": URL, "num_beams": BIG},
    {"data_url": URL, "num_beams": [BIG] * 3},
    {"data_url": URL, "num_beams": 10 ** 5000},
    {"data_url": URL, "num_beam": {"nested": BIG}},
    {"data_url": URL, "\x00" * 10: 1},
])
def test_message_never_echoes_a_long_value(raw):
    message = error(raw)
    assert len(message) < 1500, len(message)
    assert BIG[:50] not in message
    assert "\x00" not in message


@pytest.mark.parametrize("raw,shown", [
    (None, "null"), ([{"data_url": URL}], "a list of 1 item"), ("x" * 100, "a string of 100"),
    (42, "42"), (True, "true"), (3.5, "3.5"), (b"bytes", "a value of type bytes"),
])
def test_non_object_input(raw, shown):
    message = error(raw)
    assert "the job input must be a JSON object" in message and f"(got {shown}" in message


# --- fuzzing ---------------------------------------------------------------------------------

NAMES = [s.name for s in FIELDS]


def _near_misses(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name[:-1], name + "s", name.upper(), name.replace("_", ""),
                            name[1:], name.replace("_", "-"), " " + name])


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-6, 6),
    st.text(max_size=30), st.sampled_from([URL, "ftp://x", "data:image/png;base64,AAAA", ""]),
    st.integers(0, 300_000).map(lambda n: "Z" * n),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=20,
)
json_key = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES).flatmap(_near_misses),
                     st.text(string.printable, max_size=20), st.just("K" * 100_000))


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(json_key, json_value, max_size=12), json_value,
                 st.integers(1, 500).map(lambda d: {"data_url": URL, "num_beams": _deep(d)}),
                 st.integers(1, 500).map(_deep)))
def test_fuzz_parse_request_returns_or_raises_job_error(raw):
    try:
        req = parse_request(raw, CFG)
    except JobError as exc:
        assert isinstance(exc.message, str) and exc.message.startswith("invalid input: ")
        assert len(exc.message) < 6000
        assert "Z" * 50 not in exc.message and "K" * 50 not in exc.message
        return
    assert req.sources and isinstance(req.generation, GenerationParams)


def test_text_with_a_lone_surrogate_is_named_as_broken_text():
    with pytest.raises(JobError) as info:
        parse_request({"data_url": "https://example.com/a.jpg", "prompt": "a \ud800 b"}, CFG)
    assert "prompt: must be valid Unicode text" in info.value.message


def test_settings_a_generation_ignores_do_not_split_gpu_batches():
    url = {"data_url": "https://example.com/a.jpg"}
    beams = [parse_request({**url, "top_p": p, "temperature": t}, CFG).generation
             for p, t in ((0.9, 1.0), (0.5, 3.0))]
    sampled = [parse_request({**url, "use_nucleus_sampling": True, "num_beams": b,
                              "length_penalty": lp}, CFG).generation
               for b, lp in ((3, 1.0), (7, -2.0))]
    assert beams[0] == beams[1] and sampled[0] == sampled[1]
    assert sampled[0].effective_beams == 1 and sampled[0] != beams[0]
