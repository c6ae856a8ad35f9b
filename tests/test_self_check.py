"""The start-up self-check (engines/self_check.py): it passes on a sound decoder, catches an
injected mismatch or a failing decoder, switches the failing part off, and the worker then
serves the reference's captions; its outcome is in the ready line."""
import logging

import pytest

import config
import engines as engine_mod
import handler
from engines import self_check
from params import GenerationParams
from support import checkpoints
from support.images import distinct_images
from support.worker import run_handler

CHECK = GenerationParams(num_beams=3, max_length=10, min_length=2, num_captions=2,
                         repetition_penalty=1.5)


def load(**env):
    return engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0", **env}))


@pytest.fixture(scope="module")
def hf_captions():
    """What transformers' generate captions: the reference a fallback must serve."""
    eng = load(BLIP_DECODER="hf", BLIP_SELF_CHECK="0")
    return [r.captions for r in eng.caption(distinct_images(4), CHECK,
                                            prompts=checkpoints.PROMPTS[:4])]


def test_a_sound_fast_decoder_passes_and_stays_on(hf_captions):
    eng = load()
    assert eng.self_check.ok and eng.self_check.text.startswith("self-check ok (")
    assert eng.decoder == "fast" and eng.fast is not None
    assert [r.captions for r in eng.caption(distinct_images(4), CHECK,
                                            prompts=checkpoints.PROMPTS[:4])] == hf_captions


def test_an_injected_mismatch_switches_to_generate_which_then_serves(hf_captions, caplog):
    with caplog.at_level(logging.WARNING, logger="blip.engine"):
        eng = load(BLIP_INJECT_DECODER_MISMATCH="fast")
    assert not eng.self_check.ok
    assert eng.self_check.text.startswith(
        "self-check: the fast decoder gave other tokens (1 image, 1 beam: row 0 differs from "
        "token 0); transformers' generate from now on")
    assert any(eng.self_check.text in r.getMessage() for r in caplog.records)
    assert eng.decoder == "hf" and eng.fast is None
    assert [r.captions for r in eng.caption(distinct_images(4), CHECK,
                                            prompts=checkpoints.PROMPTS[:4])] == hf_captions


def test_without_the_check_the_injected_mismatch_reaches_the_captions(hf_captions):
    # the knob really breaks the fast decoder: only the self-check stands between it and users
    eng = load(BLIP_INJECT_DECODER_MISMATCH="fast", BLIP_SELF_CHECK="0")
    assert eng.self_check is None and eng.decoder == "fast"
    got = [r.captions for r in eng.caption(distinct_images(4), CHECK,
                                           prompts=checkpoints.PROMPTS[:4])]
    assert got != hf_captions


def test_graphs_knob_breaks_nothing_where_there_are_no_graphs():
    eng = load(BLIP_INJECT_DECODER_MISMATCH="graphs")  # a CPU never captures graphs
    assert eng.self_check.ok and eng.decoder == "fast"


def test_a_failing_fast_decoder_is_switched_off(monkeypatch):
    eng = load(BLIP_SELF_CHECK="0")

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(eng.fast, "generate", broken)
    outcome = self_check.run(eng)
    assert outcome.text.startswith(
        "self-check: the fast decoder failed (1 image, 1 beam: RuntimeError: no kernel image is "
        "available for execution on the device); transformers' generate from now on")
    assert eng.decoder == "hf"


def test_a_failing_reference_leaves_the_decoder_on_and_says_it_is_unchecked(monkeypatch):
    eng = load(BLIP_SELF_CHECK="0")

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(eng, "hf_tokens", broken)
    outcome = self_check.run(eng)
    assert not outcome.ok and eng.decoder == "fast"
    assert outcome.text == ("self-check could not run its reference (RuntimeError: boom); "
                            "fast decoder unchecked")


def test_in_another_dtype_on_a_cpu_the_reference_is_the_eager_padded_decoder():
    eng = load(BLIP_DTYPE="bfloat16", BLIP_SELF_CHECK="0")
    ref = self_check.reference(eng)
    assert ref.__self__.pad_eager and not ref.__self__.options.overlap
    assert self_check.run(eng).ok and eng.decoder == "fast"


def test_the_reference_on_a_cpu_in_float32_is_transformers_generate():
    eng = load(BLIP_SELF_CHECK="0")
    assert self_check.reference(eng) == eng.hf_tokens


def test_nothing_to_check_without_the_fast_decoder():
    eng = load(BLIP_DECODER="hf")
    assert eng.self_check.ok
    assert eng.self_check.text == "self-check skipped (engine transformers, decoder hf)"


@pytest.mark.parametrize("got, want, difference", [
    ([[5, 6, 9, 1, 1]], [[5, 6, 9]], None),  # what follows eos is padding
    ([[5, 7, 9]], [[5, 6, 9]], "row 0 differs from token 1"),
    ([[5, 6]], [[5, 6, 9]], "row 0 differs from token 2"),
    ([[5], [6]], [[5]], "2 rows instead of 1"),
])
def test_first_difference(got, want, difference):
    assert self_check.first_difference(got, want, eos=9) == difference


def test_the_built_in_images_are_captioned_differently():
    eng = load(BLIP_SELF_CHECK="0")
    caps = [r.caption for r in eng.caption(self_check.images(eng.image_size),
                                           GenerationParams(num_beams=1, max_length=10))]
    assert len(set(caps)) == len(caps) == max(self_check.BATCHES)


def test_the_ready_line_reports_the_outcome():
    proc = run_handler(BLIP_INJECT_DECODER_MISMATCH="fast")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    ready = next(line for line in log.splitlines() if "ready: model" in line)
    assert ("decoder hf, self-check: the fast decoder gave other tokens (1 image, 1 beam: row 0 "
            "differs from token 0); transformers' generate from now on") in ready


def test_the_ready_line_says_when_the_check_is_off():
    eng = load(BLIP_SELF_CHECK="0")
    assert handler.describe_checks(eng) == "decoder fast, self-check off (BLIP_SELF_CHECK=0)"
