"""The start-up self-check (``BLIP_SELF_CHECK``): the fast decoder proves itself where it runs.

The GPU paths of the fast decoder (CUDA graphs of the decoding step and of the image encoder,
the overlapped step) cannot run where the tests run. So every worker checks them at start, on
its own device, before it takes a job: it captions a few built-in images at two batch shapes
(one image; three with prompts of different lengths, so with left padding), greedy and with
beams, through the configured fast path, and compares the tokens with a reference that must be
identical:

- on CUDA, the same decoder run eagerly at the same padded shapes, without the overlapped step
  (graphs replay the same kernels on the same shapes: any difference is a defect);
- on a CPU in float32, transformers' generate (the fast decoder gives its tokens, as the tests
  check);
- on a CPU in another dtype, the same decoder eagerly at the padded shapes.

On a difference or an error it switches the failing part off, CUDA graphs first (and checks
again), then the fast decoder (transformers' generate from then on), logs a warning that says
what differed, and the worker goes on serving. ``Outcome.text`` is what the ready line says.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageDraw

from params import GenerationParams

log = logging.getLogger("blip.engine")

PROMPTS = ("a photo of", "", "a picture of the")
BATCHES = (1, 3)
PARAMS = (GenerationParams(num_beams=1, max_length=10, min_length=10),
          GenerationParams(num_beams=3, max_length=10, min_length=0, num_captions=2,
                           repetition_penalty=1.2))

Tokens = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, GenerationParams],
                  list[list[int]]]


@dataclass(frozen=True)
class Outcome:
    ok: bool  # the configured path gave the reference's tokens (or there was nothing to check)
    text: str  # for the ready line
    seconds: float = 0.0


def images(size: int) -> list[Image.Image]:
    """Built-in pictures, distinct enough that a model captions them differently."""
    out = []
    for i in range(max(BATCHES)):
        img = Image.linear_gradient("L").rotate(90 * i).resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(img)
        c = ((97 * i + 40) % 256, (151 * i + 90) % 256, (211 * i + 160) % 256)
        draw.ellipse((size // 8 * (i + 1), size // 6, size // 8 * (i + 4), size // 2), fill=c)
        draw.rectangle((0, size * 3 // 4, size, size), fill=c[::-1])
        out.append(img)
    return out


def first_difference(got: list[list[int]], want: list[list[int]], eos: int) -> str | None:
    """Where two decoders' rows first differ (each row up to and including eos: what follows
    is padding whose width depends on the batch's longest row), or None."""
    def cut(row: list[int]) -> list[int]:
        return row[:row.index(eos) + 1] if eos in row else row
    if len(got) != len(want):
        return f"{len(got)} rows instead of {len(want)}"
    for r, (a, b) in enumerate(zip(got, want)):
        a, b = cut(a), cut(b)
        if a != b:
            at = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"row {r} differs from token {at}"
    return None


def run(engine) -> Outcome:
    """Check ``engine``'s fast decoder (a ``TransformersEngine``), switching off what fails."""
    fast = getattr(engine, "fast", None)
    if fast is None:
        return Outcome(True, f"self-check skipped (engine {engine.name}, decoder "
                             f"{getattr(engine, 'decoder', 'its own')})")
    t0 = time.perf_counter()
    pixels = engine.collate([engine.preprocess(im) for im in images(engine.image_size)])
    cases = [(b, p, engine.model_inputs(pixels[:b], PROMPTS[:b])) for b in BATCHES
             for p in PARAMS]
    try:
        ref = reference(engine)
        want = [ref(*inputs, p) for _, p, inputs in cases]
    except Exception as exc:  # noqa: BLE001 - the worker still serves; say why unchecked
        return _unchecked(f"could not run its reference ({_short(exc)})", t0)
    eos = engine.m.eos_token_id
    steps = []
    try:
        problem = _compare(engine.fast_tokens, cases, want, eos)
        if problem and fast.cuda_graphs:
            steps.append(f"CUDA graphs {problem}; graphs off")
            fast.graphs_off()
            problem = _compare(engine.fast_tokens, cases, want, eos)
    except torch.OutOfMemoryError as exc:  # too little memory for three images: no verdict
        return _unchecked(f"ran out of memory ({_short(exc)})", t0)
    if problem:
        steps.append(f"the fast decoder {problem}; transformers' generate from now on")
        engine.use_hf_decoder()
    seconds = time.perf_counter() - t0
    if not steps:
        return Outcome(True, f"self-check ok ({seconds:.1f} s)", seconds)
    text = "self-check: " + ", then ".join(steps)
    log.warning("%s (%.1f s)", text, seconds)
    return Outcome(False, text, seconds)


def reference(engine) -> Tokens:
    """What the configured fast path must equal, token for token (see the module docstring)."""
    if engine.device.type == "cpu" and engine.dtype == torch.float32:
        return engine.hf_tokens
    import generation
    options = dataclasses.replace(engine.fast.options, cuda_graphs=False, encode_graphs=False,
                                  overlap=False, bucket=True)
    eager = generation.FastGenerator(engine.model, engine.m.eos_token_id, engine.m.pad_token_id,
                                     options)
    return eager.generate


def _compare(tokens: Tokens, cases, want: list[list[list[int]]], eos: int) -> str | None:
    """None if ``tokens`` gives ``want`` in every case, else what went wrong."""
    for (b, p, inputs), expected in zip(cases, want):
        what = f"{b} image{'s' * (b > 1)}, {p.num_beams} beam{'s' * (p.num_beams > 1)}"
        try:
            got = tokens(*inputs, p)
        except torch.OutOfMemoryError:
            raise  # not a decoder defect
        except Exception as exc:  # noqa: BLE001 - a failing path is switched off, not fatal
            return f"failed ({what}: {_short(exc)})"
        diff = first_difference(got, expected, eos)
        if diff:
            return f"gave other tokens ({what}: {diff})"
    return None


def _unchecked(why: str, t0: float) -> Outcome:
    text = f"self-check {why}; fast decoder unchecked"
    log.warning(text)
    return Outcome(False, text, time.perf_counter() - t0)


def _short(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first[:160]}"
