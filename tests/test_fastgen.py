"""fastgen gives exactly the tokens of transformers' generate, with less work per image."""
import pytest
import torch

import config
import engine as engine_mod
import fastgen
import preprocess
from params import GenerationParams as G
from test_engine import distinct_images

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
    gen = fastgen.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id,
                                bucket=bucket)
    rows = gen.generate(pxn, ids, mask, params)
    got = [eng._decode(r) for r in rows]
    k = params.num_captions
    assert [got[i * k:(i + 1) * k] for i in range(len(PROMPTS))] == want


def test_tiny_top_p_sampling_is_greedy(eng, batch):
    _, pxn, ids, mask = batch
    gen = fastgen.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
    greedy = gen.generate(pxn, ids, mask, G(num_beams=1, max_length=10))
    sampled = gen.generate(pxn, ids, mask, G(use_nucleus_sampling=True, top_p=1e-6,
                                             temperature=0.7, max_length=10, num_captions=2))
    assert sampled == [row for row in greedy for _ in range(2)]


def test_sampling_varies_and_respects_lengths(eng, batch):
    _, pxn, ids, mask = batch
    gen = fastgen.FastGenerator(eng.model, eng.m.eos_token_id, eng.m.pad_token_id)
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
    assert eng.decoder == "fast" and fastgen.supports(eng.model)
