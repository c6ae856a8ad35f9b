"""The job input: one declarative table of fields, validated strictly, with one readable error.

``FIELDS`` is the single source of truth for every request field (type, default, bounds, one-line
doc): the pydantic model ``CaptionRequest`` is generated from it, error messages are written from
it, and the README's input table is generated/checked from it (``markdown_table()``). Generation
defaults come from ``params.GenerationParams`` so they are defined once. Adding a field is one
``FieldSpec`` line (plus a rule below if it depends on another field).

``parse_request(raw, cfg)`` returns a ``CaptionRequest`` or raises ``errors.JobError`` whose
message lists every problem as ``field: what is wrong (got ...)`` and how to fix it, e.g.
``invalid input: num_beams: must be an integer from 1 to 10 (got a string '3')``. It never raises
anything else, whatever JSON (or non-JSON) value it is given.

Decisions:
- Strict types: ``"3"``, ``true`` and ``3.0`` are not integers; numbers accept integers
  (``top_p: 1``); booleans are not numbers; NaN and infinities are rejected.
- ``null`` is accepted only where the default is null (``data_url``, ``data_urls``,
  ``batch_size``) and means "not given"; elsewhere it is a type error.
- Sources are checked here (scheme and shape), so ``ftp:``, ``file:`` or a bare path fails the
  job up front, naming ``data_url`` / ``data_urls[3]``. Whether a URL answers, and whether a
  data: URI's base64 decodes, is learned while fetching (``inputs``).
- Messages never contain pydantic's text (it embeds ``input_value``) nor any input value longer
  than ``SHOW_LIMIT`` characters; at most ``MAX_PROBLEMS`` problems are listed.

No torch, no runpod, no I/O.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from config import Config
from errors import JobError
from params import DEFAULT_PROMPT, GenerationParams

SHOW_LIMIT = 40  # longest input value quoted back in a message
MAX_PROBLEMS = 20  # problems listed in one message; the rest are counted
MAX_URL_CHARS = 8192  # longest http(s) URL (data: URIs are limited by size when decoded)
SOURCE_FORMS = ("an http(s) URL or a base64 data: URI (data:<type>;base64,...) "
                "of an image or a zip of images")

_GEN = GenerationParams()


@dataclass(frozen=True)
class FieldSpec:
    """One request field. ``lo``/``hi`` bound numbers (or string length when kind is "str")."""
    name: str
    kind: str  # "url" | "urls" | "int" | "opt_int" | "float" | "bool" | "str" | "choice"
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed (top_p > 0)
    rule: str = ""  # a bound that depends on another field, for the docs ("≤ max_length")
    choices: tuple[str, ...] = ()

    @property
    def type_text(self) -> str:
        return _TYPE_TEXT[self.kind]

    @property
    def default_text(self) -> str:
        """The default as JSON (``3``, ``"a photo of"``, ``false``, ``null``)."""
        if self.default is None:
            return "null"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, str):
            return f'"{self.default}"'
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    @property
    def bounds(self) -> str:
        """Allowed values, for the README (``1..10``, ``(0, 1]``, ``≤ 300 characters``)."""
        text = _BOUNDS_TEXT[self.kind](self)
        return f"{text}, {self.rule}" if text and self.rule else text or self.rule

    def expected(self, cfg: Config) -> str:
        """What a valid value is, for error messages ("an integer from 1 to 10")."""
        return _EXPECTED[self.kind](self, cfg)

    def annotation(self) -> Any:
        """The pydantic type of this field (strictness comes from the model config)."""
        base = _ANNOTATION[self.kind](self)
        return Optional[base] if self.default is None else base


def _num(x: float | None) -> str:
    return f"{x:g}"


def _int_range(s: FieldSpec) -> str:
    return f"{_num(s.lo)}..{_num(s.hi)}"


def _float_range(s: FieldSpec) -> str:
    return f"{'(' if s.lo_open else '['}{_num(s.lo)}, {_num(s.hi)}]"


def _float_expected(s: FieldSpec, cfg: Config) -> str:
    low = f"above {_num(s.lo)}" if s.lo_open else f"from {_num(s.lo)}"
    return f"a number {low} {'and at most' if s.lo_open else 'to'} {_num(s.hi)}"


_TYPE_TEXT = {"url": "string", "urls": "list of strings", "int": "integer",
              "opt_int": "integer or null", "float": "number", "bool": "boolean",
              "str": "string", "choice": "string"}
_BOUNDS_TEXT: dict[str, Callable[[FieldSpec], str]] = {
    "url": lambda s: "http(s) URL or data: URI",
    "urls": lambda s: "1..MAX_IMAGES_PER_JOB items",
    "int": _int_range, "opt_int": _int_range, "float": _float_range,
    "bool": lambda s: "",
    "str": lambda s: f"≤ {_num(s.hi)} characters",
    "choice": lambda s: " / ".join(s.choices),  # "|" would split a Markdown table cell
}
_EXPECTED: dict[str, Callable[[FieldSpec, Config], str]] = {
    "url": lambda s, cfg: SOURCE_FORMS,
    "urls": lambda s, cfg: f"a list of 1 to {cfg.max_images_per_job} strings, each {SOURCE_FORMS}",
    "int": lambda s, cfg: f"an integer from {_num(s.lo)} to {_num(s.hi)}",
    "opt_int": lambda s, cfg: f"an integer from {_num(s.lo)} to {_num(s.hi)}, or null",
    "float": _float_expected,
    "bool": lambda s, cfg: "true or false",
    "str": lambda s, cfg: f"a string of at most {_num(s.hi)} characters",
    "choice": lambda s, cfg: "one of " + ", ".join(f'"{c}"' for c in s.choices),
}
_ANNOTATION: dict[str, Callable[[FieldSpec], Any]] = {
    "url": lambda s: str,
    "urls": lambda s: list[str],
    "int": lambda s: Annotated[int, Field(ge=s.lo, le=s.hi)],
    "opt_int": lambda s: Annotated[int, Field(ge=s.lo, le=s.hi)],
    "float": lambda s: Annotated[float, Field(gt=s.lo, le=s.hi) if s.lo_open
                                 else Field(ge=s.lo, le=s.hi)],
    "bool": lambda s: bool,
    "str": lambda s: Annotated[str, Field(max_length=int(s.hi))],
    "choice": lambda s: Literal[s.choices],
}

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("data_url", "url", None,
              "One image or zip of images: an http(s) URL or a base64 data: URI. "
              "Give exactly one of `data_url` and `data_urls`."),
    FieldSpec("data_urls", "urls", None,
              "Several images and/or zips (same forms as `data_url`); results keep this order."),
    FieldSpec("batch_size", "opt_int", None,
              "Most images of this job per GPU batch; null = the worker's choice.", 1, 256),
    FieldSpec("num_beams", "int", _GEN.num_beams,
              "Beam search width (one beam is used with nucleus sampling).", 1, 10),
    FieldSpec("max_length", "int", _GEN.max_length,
              "Most new tokens per caption (the prompt does not count).", 1, 200),
    FieldSpec("min_length", "int", _GEN.min_length,
              "Fewest new tokens per caption.", 0, 200, rule="≤ max_length"),
    FieldSpec("prompt", "str", DEFAULT_PROMPT,
              "Text the caption continues; empty = unconditional captioning.", hi=300),
    FieldSpec("use_nucleus_sampling", "bool", _GEN.use_nucleus_sampling,
              "Sample with top-p instead of beam search."),
    FieldSpec("top_p", "float", _GEN.top_p,
              "Nucleus sampling probability mass.", 0, 1, lo_open=True),
    FieldSpec("temperature", "float", _GEN.temperature,
              "Sampling temperature.", 0, 5, lo_open=True),
    FieldSpec("repetition_penalty", "float", _GEN.repetition_penalty,
              "Penalty on repeated tokens; 1 = none.", 1, 5),
    FieldSpec("length_penalty", "float", _GEN.length_penalty,
              "Beam score length exponent; above 0 favours longer captions.", -5, 5),
    FieldSpec("num_captions", "int", _GEN.num_captions,
              "Captions per image.", 1, 10, rule="≤ num_beams unless sampling"),
    FieldSpec("include_prompt", "bool", False,
              "Start each caption with the prompt."),
    FieldSpec("output_format", "choice", "json",
              "`zip` also returns the captions as a zip of `<image name>.txt` files "
              "(see \"Captions as files\").", choices=("json", "zip")),
)
FIELD_BY_NAME = {s.name: s for s in FIELDS}


class _RequestBase(BaseModel):
    """Behaviour shared by the generated ``CaptionRequest`` model."""
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    @property
    def sources(self) -> list[str]:
        """The URLs / data: URIs to caption, in order (``data_url`` wrapped in a list)."""
        data_url = getattr(self, "data_url")
        return [data_url] if data_url is not None else list(getattr(self, "data_urls"))

    @property
    def single(self) -> bool:
        """True when the job used ``data_url`` (its failure to download fails the job)."""
        return getattr(self, "data_url") is not None

    @property
    def generation(self) -> GenerationParams:
        names = [f.name for f in dataclasses.fields(GenerationParams)]
        return GenerationParams(**{name: getattr(self, name) for name in names}).normalized()


CaptionRequest = create_model(  # type: ignore[call-overload]
    "CaptionRequest", __base__=_RequestBase,
    **{s.name: (s.annotation(), s.default) for s in FIELDS})


def markdown_table() -> str:
    """The README's input table, generated from ``FIELDS``."""
    rows = ["| field | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for s in FIELDS:
        default = "—" if s.kind in ("url", "urls") else f"`{s.default_text}`"
        rows.append(f"| `{s.name}` | {s.type_text} | {default} | {s.bounds} | {s.doc} |")
    return "\n".join(rows)


# --- sources ---------------------------------------------------------------------------------

def source_problem(text: str) -> str | None:
    """Why ``text`` is not a usable source (http(s) URL or base64 data: URI); None if it is."""
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https"):
        return _url_problem(text)
    if scheme == "data":
        if "," not in text:
            return "a data: URI needs a comma between its header and its data"
        if not text.split(",", 1)[0].lower().endswith(";base64"):
            return "only base64 data: URIs are supported (data:<type>;base64,<data>)"
        return None
    if not re.fullmatch(r"[a-z][a-z0-9+.-]+", scheme):  # a bare path, a C:\ path
        return "not a URL"
    return f"the {scheme}: scheme is not allowed"


def _url_problem(url: str) -> str | None:
    if len(url) > MAX_URL_CHARS:
        return f"the URL is {len(url)} characters long; the limit is {MAX_URL_CHARS}"
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises for a bad port
    except ValueError as exc:  # bad port, bad IPv6 literal
        return f"not a valid URL ({exc})"
    return None if host else "the URL has no host"


# --- messages --------------------------------------------------------------------------------

def show(value: Any) -> str:
    """Describe an input value for a message without ever echoing more than SHOW_LIMIT chars."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value) if value.bit_length() < 100 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if len(value) > SHOW_LIMIT:
            return f"a string of {len(value)} characters"
        return "an empty string" if not value else f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        count = len(value)
        return f"a list of {count} item{'s' if count > 1 else ''}" if value else "an empty list"
    if isinstance(value, dict):
        return "an object"
    return f"a value of type {type(value).__name__}"


def _key_name(key: Any) -> str:
    if isinstance(key, str) and len(key) <= SHOW_LIMIT and key.isprintable():
        return key
    return show(key)


def _unknown_keys(raw: dict) -> list[str]:
    """One problem per unknown key, with a suggestion when one is close (``num_beam``)."""
    problems, lost = [], False
    for key in (k for k in raw if k not in FIELD_BY_NAME):
        close = (difflib.get_close_matches(key, list(FIELD_BY_NAME), n=1)
                 if isinstance(key, str) and len(key) <= 2 * SHOW_LIMIT else [])
        lost = lost or not close
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"{_key_name(key)}: unknown parameter{hint}")
    if lost:
        problems.append("the parameters are " + ", ".join(FIELD_BY_NAME))
    return problems


def _field_problem(spec: FieldSpec, value: Any, cfg: Config) -> str:
    if isinstance(value, str) and not _is_text(value):
        return (f"{spec.name}: must be valid Unicode text (it contains an unpaired surrogate, "
                "e.g. a broken \\ud800 escape); send UTF-8 text")
    return f"{spec.name}: must be {spec.expected(cfg)} (got {show(value)})"


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _item_problem(name: str, index: int, value: Any, problem: str) -> str:
    return f"{name}[{index}]: {problem} (got {show(value)})"


def _type_problems(raw: dict, cfg: Config) -> tuple[list[str], set[str]]:
    """Per-field problems from pydantic (by field, in FIELDS order) and the set of bad fields."""
    known = {k: v for k, v in raw.items() if k in FIELD_BY_NAME}
    try:
        CaptionRequest.model_validate(known)
        return [], set()
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    problems: dict[str, list[str]] = {}
    for err in errors:
        name = str(err["loc"][0])
        index = next((p for p in err["loc"][1:] if isinstance(p, int)), None)
        if index is None:
            text = _field_problem(FIELD_BY_NAME[name], raw[name], cfg)
        else:
            text = _item_problem(name, index, raw[name][index], f"must be {SOURCE_FORMS}")
        problems.setdefault(name, [])
        if text not in problems[name]:
            problems[name].append(text)
    ordered = [p for s in FIELDS for p in problems.get(s.name, [])]
    return ordered, set(problems)


# --- rules across fields (run only when every field they read is valid) ----------------------

def _sources_rule(v: dict, cfg: Config) -> list[str]:
    url, urls = v["data_url"], v["data_urls"]
    if url is None and urls is None:
        return [f"data_url: required: give data_url ({SOURCE_FORMS}) or data_urls (a list)"]
    if url is not None and urls is not None:
        return ["data_url and data_urls: give only one of them "
                "(data_url for one image or zip, data_urls for a list)"]
    if url is not None:
        problem = source_problem(url)
        return [f"data_url: {problem} (got {show(url)}); use {SOURCE_FORMS}"] if problem else []
    if not 1 <= len(urls) <= cfg.max_images_per_job:
        return [f"{_field_problem(FIELD_BY_NAME['data_urls'], urls, cfg)}; the limit is set by "
                "MAX_IMAGES_PER_JOB"]
    problems = [_item_problem("data_urls", i, u, p)
                for i, u in enumerate(urls) if (p := source_problem(u))]
    return problems + [f"data_urls: each item must be {SOURCE_FORMS}"] if problems else []


def _length_rule(v: dict, cfg: Config) -> list[str]:
    if v["min_length"] <= v["max_length"]:
        return []
    return [f"min_length: must be at most max_length (got min_length {v['min_length']} "
            f"with max_length {v['max_length']}); lower min_length or raise max_length"]


def _captions_rule(v: dict, cfg: Config) -> list[str]:
    if v["use_nucleus_sampling"] or v["num_captions"] <= v["num_beams"]:
        return []
    return [f"num_captions: must be at most num_beams ({v['num_beams']}) unless "
            f"use_nucleus_sampling is true (got {v['num_captions']}); raise num_beams or "
            "set use_nucleus_sampling to true"]


_RULES: tuple[tuple[tuple[str, ...], Callable[[dict, Config], list[str]]], ...] = (
    (("data_url", "data_urls"), _sources_rule),
    (("min_length", "max_length"), _length_rule),
    (("num_captions", "num_beams", "use_nucleus_sampling"), _captions_rule),
)


def _rule_problems(raw: dict, bad: set[str], cfg: Config) -> list[str]:
    values = {s.name: raw.get(s.name, s.default) for s in FIELDS}
    problems: list[str] = []
    for names, rule in _RULES:
        if not bad.intersection(names):
            problems += rule(values, cfg)
    return problems


def _fail(problems: list[str]) -> JobError:
    listed = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        listed.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
    return JobError("invalid input: " + "; ".join(listed))


def parse_request(raw: Any, cfg: Config) -> CaptionRequest:
    """Validate a job's input; raise ``JobError`` listing every problem (never anything else)."""
    if not isinstance(raw, dict):
        raise JobError('invalid input: the job input must be a JSON object such as '
                       f'{{"data_url": "https://example.com/photo.jpg"}} (got {show(raw)})')
    problems, bad = _type_problems(raw, cfg)
    problems += _rule_problems(raw, bad, cfg)
    problems += _unknown_keys(raw)
    if problems:
        raise _fail(problems)
    return CaptionRequest.model_validate(raw)
