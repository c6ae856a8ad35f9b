"""The fast decoder gives exactly the tokens of transformers' generate, with less work per image."""
import logging

import pytest
import torch

import config
import engines as engine_mod
import generation
import preprocess
from engines import TransformersEngine
from generation import graphs as graphs_mod
from generation import search
from generation.workspace import EncodeGraph
from params import GenerationParams as G
from support import checkpoints
from support.images import distinct_images

PROMPTS = ["a photo of", "a", "an image showing the", "a photo of", "", "xx"]


@pytest.fixture(scope="module")
def eng():
    return engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0", "BLIP_DECODER": "hf"}))


@pytest.fixture(scope="module")
def batch(eng):
    imgs = distinct_images(len(PROMPTS))
    px = torch.stack([eng.preprocess(i) for i in imgs])
    ids, mask = eng.build_inputs(PROMPTS)
    return px, preprocess.normalize(px), ids, mask


@pytest.mark.parametrize("params", [
    G(num_beams=1, max_length=15, min_length=3),
    G(num_beams=3, max_length=15, min_length=3),
    G(num_beams=3, max_length=15, min_length=0, num_captions=3),
    G(num_beams=5, max_length=20, min_length=8, repetition_penalty=1.5, length_penalty=0.5,
      num_captions=2),
    G(num_beams=4, max_length=12, length_penalty=-2.0),
    G(num_beams=2, max_length=6, min_length=6),
    G(num_beams=1, max_length=10, repetition_penalty=2.0),
], ids=["greedy", "beams3", "beams3x3", "beams5-penalties", "beams4-neg-lp", "forced", "rep"])
@pytest.mark.parametrize("bucket", [False, True], ids=["exact-shapes", "padded-shapes"])
def test_same_tokens_as_transformers_generate(eng, batch, params, bucket):
    px, pxn, ids, mask = batch
    want = eng._generate(px, PROMPTS, params)  # BLIP_DECODER=hf: model.generate
    # padded-shapes: the batch and the prompt are padded to the fixed shapes CUDA graphs use
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id,
                                   generation.DecodeOptions(bucket=bucket))
    rows = gen.generate(pxn, ids, mask, params)
    got = [eng._decode(r) for r in rows]
    k = params.num_captions
    assert [got[i * k:(i + 1) * k] for i in range(len(PROMPTS))] == want


def test_tiny_top_p_sampling_is_greedy(eng, batch):
    _, pxn, ids, mask = batch
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    greedy = gen.generate(pxn, ids, mask, G(num_beams=1, max_length=10))
    sampled = gen.generate(pxn, ids, mask, G(use_nucleus_sampling=True, top_p=1e-6,
                                             temperature=0.7, max_length=10, num_captions=2))
    assert sampled == [row for row in greedy for _ in range(2)]


def test_sampling_varies_and_respects_lengths(eng, batch):
    _, pxn, ids, mask = batch
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    torch.manual_seed(1)
    rows = gen.generate(pxn, ids, mask, G(use_nucleus_sampling=True, top_p=0.95,
                                          temperature=2.0, max_length=9, min_length=9,
                                          num_captions=3))
    assert len(rows) == 3 * len(PROMPTS)
    assert all(len(r) == 9 and eng.m.eos_token_id not in r for r in rows)
    assert len({tuple(r) for r in rows}) > len(PROMPTS)


def test_the_engine_uses_the_fast_decoder_by_default():
    eng = engine_mod.load_engine(config.Config.from_env({"BLIP_MODEL": "tiny-random",
                                                         "BLIP_WARMUP": "0"}))
    assert eng.decoder == "fast" and generation.supports(eng.model)


@pytest.mark.parametrize("overlap", [False, True], ids=["check-then-step", "step-then-check"])
@pytest.mark.parametrize("beams", [1, 3])
def test_stopping_early_gives_the_same_tokens_with_or_without_overlap(eng, batch, overlap, beams):
    # the real model stops at eos long before max_length; both loop orders must agree with
    # transformers there (overlap queues one more decoder pass, whose output is discarded)
    px, pxn, _, _ = batch
    pick = [1, 3]  # images whose tiny-model captions end within 40 tokens
    prompts = [PROMPTS[i] for i in pick]
    ids, mask = eng.build_inputs(prompts)
    params = G(num_beams=beams, max_length=40, min_length=0)
    want = eng._generate(px[pick], prompts, params)
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id,
                                   generation.DecodeOptions(overlap=overlap))
    steps = []
    real_step = gen._run_step
    gen._run_step = lambda *a: steps.append(a[-1]) or real_step(*a)
    rows = gen.generate(pxn[pick], ids, mask, params)
    assert [[eng._decode(r)] for r in rows] == want
    assert all(eng.m.eos_token_id in r for r in rows)
    if beams == 1:  # (beam search's length heuristic runs on to max_length on this model)
        assert len(steps) < 39  # the search did stop early


def test_encoder_graph_inputs_pad_a_small_batch_without_changing_it(eng, batch):
    # What the CUDA graph of image encoding + prefill is fed (on CPU, run eagerly): the batch
    # padded to the workspace's capacity with copies of its first image, the prompts
    # left-padded to the workspace's length. The real images' outputs must not change.
    _, pxn, ids, mask = batch
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id,
                                   generation.DecodeOptions(bucket=True))
    b = 3
    ws = gen._workspace(b, 1, ids.shape[1], 4, eng.model.language_model.lm_head.weight)
    assert ws.images == 4 and ws.length > ids.shape[1]  # a padded shape
    want = gen._encode(pxn[:b], ids[:b], mask[:b], ws)
    want_prefix = ws.prefix[:, :b].clone()
    enc = EncodeGraph(
        pixels=torch.full((4, *pxn.shape[1:]), float("nan")),
        ids=torch.full((4, ws.length), -1), mask=torch.full((4, ws.length), -1),
        valid=torch.zeros(4, dtype=torch.long), logits=torch.zeros(4, 1))
    gen._fill_encode_inputs(enc, pxn[:b], ids[:b], mask[:b])
    assert not enc.pixels.isnan().any() and (enc.ids >= 0).all() and (enc.mask >= 0).all()
    got = gen.prefill(enc.pixels, enc.ids, enc.mask, ws)
    assert torch.equal(got.valid[:b], want.valid)
    torch.testing.assert_close(got.logits[:b], want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws.prefix[:, :b], want_prefix, rtol=1e-5, atol=1e-5)


def test_fused_projections_share_the_model_parameters(eng):
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    attn = eng.model.language_model.model.decoder.layers[0].self_attn
    w, b = gen._qkv[0]
    n = attn.q_proj.weight.shape[0]
    assert attn.k_proj.weight.data_ptr() == w[n:].data_ptr()  # views: no second copy
    assert torch.equal(w[2 * n:], attn.v_proj.weight) and torch.equal(b[:n], attn.q_proj.bias)
    again = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    assert again._qkv[0][0] is w  # a second generator on the same model reuses them


def test_unfused_projections_give_the_same_tokens(eng, batch):
    # the path for decoders whose q/k/v cannot be fused (no biases, offloaded, hooked)
    _, pxn, ids, mask = batch
    params = G(num_beams=3, max_length=10, min_length=2)
    fused = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    plain = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id,
                                     generation.DecodeOptions(fuse_qkv=False))
    assert plain._qkv == [None] * len(plain._qkv)
    assert plain.generate(pxn, ids, mask, params) == fused.generate(pxn, ids, mask, params)


# --- a model that does not suppress <pad>, loaded from disk ---------------------------------
# tiny-random suppresses every token but a-z, space and eos, which hid a defect: the repetition
# penalty counted a batch's left padding as prompt tokens, so <pad>'s score (and the captions)
# depended on the other prompts in the batch. The chatty checkpoint (support.checkpoints)
# suppresses nothing, makes <pad> a likely token and eos a frequent one.
@pytest.fixture(scope="module")
def chatty(chatty_dir):
    """The chatty checkpoint through the real loading path, on transformers' generate."""
    return engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": str(chatty_dir), "BLIP_WARMUP": "0", "BLIP_DECODER": "hf"}))


def _caption_tokens(row: list[int], eos: int) -> list[int]:
    """A row's tokens up to and including eos: what follows is padding, whose width depends
    on the longest row of the batch."""
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("params", checkpoints.MIXES,
                         ids=[checkpoints.mix_id(p) for p in checkpoints.MIXES])
def test_fast_decoder_gives_generate_tokens_on_a_model_that_does_not_suppress_pad(chatty, params):
    m = chatty.m
    assert not chatty.model.language_model.generation_config.suppress_tokens
    pxn = preprocess.normalize(torch.stack(
        [chatty.preprocess(im) for im in distinct_images(len(checkpoints.PROMPTS))]))
    ids, mask = chatty.build_inputs(checkpoints.PROMPTS)
    out = chatty.model.generate(pixel_values=pxn, input_ids=ids, attention_mask=mask,
                                **chatty._generation_kwargs(params))
    want = [_caption_tokens(r, m.eos_token_id) for r in out[:, ids.shape[1]:].tolist()]
    gen = generation.FastGenerator(chatty.model, m.eos_token_id, m.pad_token_id)
    got = [_caption_tokens(r, m.eos_token_id) for r in gen.generate(pxn, ids, mask, params)]
    assert got == want


# --- shapes, budget and the generation config -------------------------------------------------
@pytest.mark.parametrize("graphs, pad_eager, fits, want", [
    (True, False, True, (24, 48, True)),  # graphs: padded to the graph shape, kept for replay
    (True, False, False, (17, 41, False)),  # over the graph budget: eager at the exact shape
    (False, False, True, (17, 41, False)),  # graphs off (failed captures, self-check): exact
    (False, True, True, (24, 48, False)),  # padding asked for (tests, the self-check reference)
])
def test_batches_are_padded_only_where_a_graph_replays_them(graphs, pad_eager, fits, want):
    seen = []

    def budget(cap, length):
        seen.append((cap, length))
        return fits
    assert graphs_mod.workspace_shape(17, 41, graphs=graphs, pad_eager=pad_eager,
                                      fits=budget) == want
    assert seen == ([(24, 48)] if graphs else [])  # the budget is asked about the padded shape


def test_after_graphs_fail_the_production_path_runs_exact_shapes(eng):
    # three failed captures leave cuda_graphs off; the batch must not be padded any more
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id,
                                   generation.DecodeOptions(cuda_graphs=True,
                                                            graph_memory_bytes=2 ** 30))
    like = eng.model.language_model.lm_head.weight
    gen.cuda_graphs = False
    ws = gen._workspace(17, 1, 41, 4, like)
    assert (ws.images, ws.length) == (17, 41) and not gen._cache
    gen.graphs_off()
    assert not gen.encode_graphs and gen.pool_bytes == 0


def test_the_graph_budget_counts_the_graph_pool(eng):
    gen = generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    like = eng.model.language_model.lm_head.weight
    for images in (1, 2, 4):
        ws = gen._new_workspace(images, 1, 40, 4, like)
        gen._cache[("ws", images)] = ws
    sizes = [w.bytes for w in gen._cache.values()]
    gen.graph_memory_bytes = sum(sizes) + 100
    gen.pool_bytes = 0
    gen._evict(100)  # fits beside the three
    assert len(gen._cache) == 3
    gen.pool_bytes = sizes[0]  # the graphs' pool now holds as much as the oldest workspace
    gen._evict(100)
    assert list(gen._cache) == [("ws", 2), ("ws", 4)]  # least recently used goes first
    gen.pool_bytes = gen.graph_memory_bytes  # the pool alone fills the budget
    gen._evict(1)
    assert not gen._cache
    assert not graphs_mod.within_budget(1, 0, gen.pool_bytes, gen.graph_memory_bytes)
    gen.release()
    assert gen.pool_bytes == 0


def test_generation_config_settings_the_fast_decoder_lacks_send_the_model_to_generate(caplog):
    eng = engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0", "BLIP_SELF_CHECK": "0"}))
    gc = eng.model.language_model.generation_config
    assert search.unsupported_settings(gc) == []  # suppress_tokens: honoured
    cases = {"early_stopping": True, "no_repeat_ngram_size": 3, "bad_words_ids": [[5]],
             "forced_bos_token_id": 7, "forced_eos_token_id": 9, "begin_suppress_tokens": [4],
             "min_new_tokens": 2, "typical_p": 0.5}
    for name, value in cases.items():
        saved = getattr(gc, name)
        setattr(gc, name, value)
        try:
            assert search.unsupported_settings(gc) == [f"{name}={value!r}"]
            with caplog.at_level(logging.WARNING, logger="blip.engine"):
                caplog.clear()
                other = TransformersEngine(eng.cfg, eng.device, eng.dtype, eng.m)
            assert other.decoder == "hf" and other.fast is None
            assert f"{name}={value!r}" in caplog.text and "transformers' generate" in caplog.text
            with pytest.raises(ValueError, match=name):
                generation.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
        finally:
            setattr(gc, name, saved)
    # transformers' own behaviour, written out, changes nothing
    for name, value in {"early_stopping": False, "no_repeat_ngram_size": 0,
                        "num_beam_groups": 1, "use_cache": True}.items():
        saved = getattr(gc, name)
        setattr(gc, name, value)
        try:
            assert search.unsupported_settings(gc) == []
        finally:
            setattr(gc, name, saved)


def test_a_setting_the_search_honours_keeps_the_fast_decoder(monkeypatch, eng):
    gc = eng.model.language_model.generation_config
    monkeypatch.setattr(gc, "no_repeat_ngram_size", 3)
    assert generation.refusal(eng.model)
    monkeypatch.setattr(search, "HONOURED", search.HONOURED | {"no_repeat_ngram_size"})
    assert generation.refusal(eng.model) is None
