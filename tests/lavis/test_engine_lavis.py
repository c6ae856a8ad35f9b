"""The LAVIS engine on the tiny offline LAVIS model (CPU, fp32): LAVIS's own preprocessing and
generate, with our batching and parameter semantics on top."""
from __future__ import annotations

import socket

import pytest
import torch

import preprocess
import testing_models
from engines.lavis_engine import LavisEngine, clean, generate_kwargs, group_by_prompt
from lavis_testlib import GenerateRecorder, captions, pictures, sharing, tiny_cfg
from params import DEFAULT_PROMPT, GenerationParams

GREEDY = GenerationParams(num_beams=1, max_length=20, min_length=5)
BEAMS3 = GenerationParams(num_beams=3, max_length=20, min_length=5)
CAPTION_CHARS = set(testing_models.CAPTION_CHARS)


# --- loading --------------------------------------------------------------------------------
def test_tiny_lavis_builds_offline_from_scratch(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tiny LAVIS model must build without network access")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    eng = LavisEngine.load(tiny_cfg())
    art = testing_models.TinyArtifacts(testing_models.cache_root())
    assert art.root.is_relative_to(tmp_path) and art.complete() and art.checkpoint.is_file()
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from lavis.models.eva_vit import VisionTransformer
    assert type(eng.model) is Blip2OPT and eng.model_id == "tiny-random" and eng.name == "lavis"
    assert isinstance(eng.model.visual_encoder, VisionTransformer)
    assert eng.model.visual_encoder.patch_embed.patch_size == (14, 14)
    assert eng.image_size == 364 and eng.model.query_tokens.shape[1] == 32
    assert eng.model.prompt == "a photo of"  # the real caption_coco_opt2.7b yaml
    assert all(p.dtype == torch.float32 for p in eng.model.parameters())  # LAVIS's .float()
    assert captions(eng.caption(pictures(2), GREEDY)) == captions(
        LavisEngine.load(tiny_cfg()).caption(pictures(2), GREEDY))  # rebuilt from the cache


def test_load_engine_selects_lavis_and_warms_up(lavis_engine):
    assert isinstance(lavis_engine, LavisEngine)
    assert lavis_engine.warmup_s > 0 and lavis_engine.load_s > 0


# --- preprocessing --------------------------------------------------------------------------
@pytest.mark.parametrize("mode,size", [("RGB", (64, 48)), ("RGBA", (500, 300)), ("L", (364, 364)),
                                       ("P", (200, 900)), ("RGB", (1, 1))])
def test_preprocess_is_lavis_eval_processor_and_matches_ours(lavis_engine, mode, size):
    from lavis.processors.blip_processors import BlipImageEvalProcessor
    assert isinstance(lavis_engine.vis_processor, BlipImageEvalProcessor)
    img = pictures(1, start=sum(size))[0].resize(size).convert(mode)
    x = lavis_engine.preprocess(img)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 364, 364)
    torch.testing.assert_close(x, preprocess.to_tensor(img), atol=1e-5, rtol=0)


# --- captions -------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [GREEDY, BEAMS3], ids=["greedy", "beams3"])
def test_distinct_images_give_distinct_readable_captions(lavis_engine, params):
    caps = captions(lavis_engine.caption(pictures(12), params))
    assert len(set(caps)) == 12, caps
    for cap in caps:
        assert cap and cap == cap.strip() and set(cap) <= CAPTION_CHARS, cap


@pytest.mark.parametrize("params", [GREEDY, BEAMS3], ids=["greedy", "beams3"])
def test_batch_of_six_equals_one_at_a_time(lavis_engine, params):
    imgs = pictures(6)
    together = captions(lavis_engine.caption(imgs, params, batch_size=6))
    alone = captions(lavis_engine.caption(imgs, params, batch_size=1))
    assert together == alone


def test_mixed_prompts_in_one_batch_equal_each_alone(lavis_engine):
    imgs = pictures(6)
    prompts = ["a photo of", "", "a photo of", "an image showing", "", "a photo of"]
    mixed = captions(lavis_engine.caption(imgs, BEAMS3, prompts=prompts, batch_size=6))
    alone = [captions(lavis_engine.caption([im], BEAMS3, prompts=p))[0]
             for im, p in zip(imgs, prompts)]
    assert mixed == alone
    assert mixed[0] != captions(lavis_engine.caption(imgs[:1], BEAMS3, prompts=""))[0]


def test_include_prompt_prepends_it(lavis_engine):
    img = pictures(1)
    plain = captions(lavis_engine.caption(img, GREEDY))[0]
    assert captions(lavis_engine.caption(img, GREEDY, include_prompt=True)) == [
        f"{DEFAULT_PROMPT} {plain}"]


def test_injected_oom_falls_back_and_still_captions_all_identically(lavis_engine):
    imgs = pictures(6)
    expected = captions(lavis_engine.caption(imgs, BEAMS3, batch_size=6))
    chaos = sharing(lavis_engine, BLIP_INJECT_OOM_ABOVE_BATCH="1")
    with pytest.raises(torch.OutOfMemoryError):
        chaos.generate_batch(torch.stack([chaos.preprocess(i) for i in imgs]),
                             [DEFAULT_PROMPT] * 6, BEAMS3)
    assert captions(chaos.caption(imgs, BEAMS3, batch_size=6)) == expected


# --- lengths: new tokens, prompt and query embeddings not counted ------------------------------
def _counts(eng, imgs, params, prompt=DEFAULT_PROMPT):
    with GenerateRecorder(eng.model) as rec:
        caps = captions(eng.caption(imgs, params, prompts=prompt))
    return caps, rec.new_token_counts()


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("prompt", [DEFAULT_PROMPT, ""])
def test_max_length_counts_new_tokens(lavis_engine, beams, prompt):
    imgs = pictures(6)
    for m in (1, 7):
        caps, counts = _counts(lavis_engine, imgs, GenerationParams(
            num_beams=beams, max_length=m, min_length=0), prompt)
        assert max(counts) <= m and all(len(c) <= m for c in caps)
    caps, counts = _counts(lavis_engine, imgs, GenerationParams(
        num_beams=beams, max_length=9, min_length=9), prompt)
    assert counts == [9] * 6, counts


def test_longest_prompt_and_caption_fit(lavis_engine):
    prompt = "a photo of " * 27 + "abc"  # 300 characters: 300 tokens
    caps, counts = _counts(lavis_engine, pictures(1), GenerationParams(
        num_beams=1, max_length=200, min_length=200), prompt)
    assert counts == [200] and not caps[0].startswith(prompt)


@pytest.mark.parametrize("beams", [1, 3])
def test_min_length_counts_new_tokens_exactly(lavis_engine, beams):
    """Find captions that end early (eos after n0 tokens); min_length=n0 must leave them as
    they are and min_length=n0+1 must lengthen them: off by one token either way fails (e.g.
    counting the prompt's 11 tokens or the 32 query embeddings)."""
    imgs = pictures(20)
    natural = GenerationParams(num_beams=beams, max_length=25, min_length=0)
    caps, counts = _counts(lavis_engine, imgs, natural)
    early = [(i, n) for i, n in enumerate(counts) if n < natural.max_length]
    assert early, "no caption ended early: the test would prove nothing"
    for i, n0 in early[:3]:
        same, c_same = _counts(lavis_engine, [imgs[i]], GenerationParams(
            num_beams=beams, max_length=25, min_length=n0))
        longer, c_longer = _counts(lavis_engine, [imgs[i]], GenerationParams(
            num_beams=beams, max_length=25, min_length=n0 + 1))
        assert same == [caps[i]] and c_same == [n0]
        assert c_longer[0] >= n0 + 1 and longer != same


# --- several captions, sampling, the other parameters ----------------------------------------
def test_num_captions_with_beams_are_distinct_and_best_first(lavis_engine):
    imgs = pictures(3)
    params = GenerationParams(num_beams=3, max_length=15, min_length=3, num_captions=3)
    results = lavis_engine.caption(imgs, params)
    best = captions(lavis_engine.caption(imgs, GenerationParams(num_beams=3, max_length=15,
                                                                 min_length=3)))
    for res, first in zip(results, best):
        assert res.error is None and len(res.captions) == 3 and len(set(res.captions)) == 3
        assert res.captions[0] == first


def test_num_captions_with_sampling(lavis_engine):
    imgs = pictures(3)
    params = GenerationParams(use_nucleus_sampling=True, num_beams=5, max_length=15,
                              min_length=3, top_p=0.95, num_captions=4)
    torch.manual_seed(0)
    first = lavis_engine.caption(imgs, params)
    torch.manual_seed(0)
    again = lavis_engine.caption(imgs, params)
    assert [r.captions for r in first] == [r.captions for r in again]
    for res in first:
        assert len(res.captions) == 4 and len(set(res.captions)) > 1
        assert all(set(c) <= CAPTION_CHARS for c in res.captions)


def test_sampling_honours_top_p_and_temperature(lavis_engine):
    imgs = pictures(4)
    greedy = captions(lavis_engine.caption(imgs, GREEDY))
    for knob in (dict(top_p=1e-6), dict(temperature=1e-3)):
        torch.manual_seed(1)
        sampled = lavis_engine.caption(imgs, GenerationParams(
            use_nucleus_sampling=True, max_length=20, min_length=5, **knob))
        assert captions(sampled) == greedy, knob  # the top token only: sampling == greedy
    torch.manual_seed(1)
    hot = captions(lavis_engine.caption(imgs, GenerationParams(
        use_nucleus_sampling=True, max_length=20, min_length=5, temperature=5.0)))
    assert hot != greedy


def test_repetition_and_length_penalties_reach_lavis(lavis_engine):
    imgs = pictures(6)
    base = captions(lavis_engine.caption(imgs, BEAMS3))
    repeat = captions(lavis_engine.caption(imgs, GenerationParams(
        num_beams=3, max_length=20, min_length=5, repetition_penalty=5.0)))
    longer = captions(lavis_engine.caption(imgs, GenerationParams(
        num_beams=3, max_length=20, min_length=0, length_penalty=5.0)))
    shorter = captions(lavis_engine.caption(imgs, GenerationParams(
        num_beams=3, max_length=20, min_length=0, length_penalty=-5.0)))
    assert repeat != base
    assert sum(map(len, longer)) > sum(map(len, shorter))


def test_generate_kwargs_map_every_field():
    params = GenerationParams(num_beams=4, max_length=33, min_length=7, top_p=0.8,
                              temperature=0.7, repetition_penalty=1.3, length_penalty=0.6,
                              num_captions=2)
    assert generate_kwargs(params, prompt_tokens=4) == dict(
        use_nucleus_sampling=False, num_beams=4, max_length=33, min_length=11, top_p=0.8,
        temperature=0.7, repetition_penalty=1.3, length_penalty=0.6, num_captions=2)
    sampled = generate_kwargs(GenerationParams(use_nucleus_sampling=True, num_beams=4), 1)
    assert sampled["num_beams"] == 1 and sampled["use_nucleus_sampling"] is True


def test_group_by_prompt_and_clean():
    assert group_by_prompt(["b", "a", "b", "", "a"]) == {"b": [0, 2], "a": [1, 4], "": [3]}
    assert list(group_by_prompt(["b", "a"])) == ["b", "a"]
    assert clean("  a cat \nsat") == "a cat" and clean("dog\n") == "dog"
