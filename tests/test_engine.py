"""The transformers caption engine on the tiny random BLIP-2 (CPU, fp32)."""
import logging

import pytest
import torch
from PIL import Image

import config
import engines as engine_mod
import modeling
import testing_models
from engines import TransformersEngine
from errors import FatalDeviceError, ModelLoadError
from params import CaptionResult, GenerationParams
from support import checkpoints
from support.engine import caption_token_count, record_batches, record_token_rows
from support.images import distinct_images

GREEDY = GenerationParams(num_beams=1, max_length=12, min_length=5)
BEAMS3 = GenerationParams(num_beams=3, max_length=12, min_length=5)


def tiny_cfg(**env):
    return config.Config.from_env({"BLIP_MODEL": "tiny-random", **env})


@pytest.fixture(scope="module")
def engine():
    return engine_mod.load_engine(tiny_cfg())


def captions(results):
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.caption for r in results]


def test_tiny_random_builds_and_passes_invariants():
    # Load time is reported by `python scripts/bench.py --mode load`, not asserted here.
    loaded = testing_models.load_model("tiny-random", torch.device("cpu"), torch.float32)
    assert loaded.num_query_tokens == 32 and loaded.image_size == 364
    assert loaded.model.config.vision_config.patch_size == 14
    assert loaded.eos_token_id == loaded.tokenizer("\n", add_special_tokens=False).input_ids[0]
    assert loaded.tokenizer.padding_side == "left"


def test_invariant_guard_rejects_a_model_without_image_token():
    loaded = testing_models.load_model("tiny-random", torch.device("cpu"), torch.float32)
    loaded.model.config.image_token_index = None
    with pytest.raises(ModelLoadError, match="image_token_index"):
        modeling.check_invariants(loaded)


def test_random_full_config_is_the_real_architecture():
    cfg = testing_models.full_config()
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size, v.qkv_bias) == (1408, 39, 16, 6144, 364, 14, True)
    assert (q.hidden_size, q.num_hidden_layers, q.cross_attention_frequency) == (768, 12, 2)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.ffn_dim,
            t.vocab_size) == (2560, 32, 32, 10240, 50304)
    assert cfg.image_token_index == 50265 and cfg.num_query_tokens == 32
    tok = testing_models.full_vocab_tokenizer()
    assert modeling.newline_id(tok) == 50118
    assert tok.convert_tokens_to_ids("<image>") == 50265


def test_lavis_engine_outside_its_environment_says_where_to_run_it(monkeypatch, capsys):
    import importlib.util

    import handler
    try:  # ("lavis" alone would find tests/lavis, a namespace package under pytest)
        installed = importlib.util.find_spec("lavis.models") is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        pytest.skip("LAVIS is installed here; this checks the main environment")
    for name, value in {"BLIP_ENGINE": "lavis", "BLIP_MODEL": "tiny-random",
                        "RUNPOD_LOG_LEVEL": "INFO"}.items():
        monkeypatch.setenv(name, value)
    blip = logging.getLogger("blip")  # main() routes it through runpod's logger (stdout)
    saved = blip.handlers[:], blip.level, blip.propagate
    try:
        assert handler.main() == 1  # exits before taking jobs, without a traceback
    finally:  # later tests (the benchmark's JSON on stdout) must not see runpod's log lines
        blip.handlers[:], blip.level, blip.propagate = saved
    err = capsys.readouterr().err
    assert "BLIP_ENGINE=lavis" in err and "make venv-lavis" in err and "Traceback" not in err


def test_missing_weights_give_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        modeling.load_model(str(tmp_path / "no-such-model"), torch.device("cpu"), torch.float32)
    msg = str(info.value)
    assert "BLIP_MODEL" in msg and "builder/fetch_model.py" in msg and "tiny-random" in msg


def test_distinct_images_give_distinct_captions(engine):
    caps = captions(engine.caption(distinct_images(8), GREEDY))
    assert len(set(caps)) == 8, caps
    assert all(c and c == c.strip() and "\n" not in c for c in caps)


@pytest.mark.parametrize("params", [GREEDY, BEAMS3], ids=["greedy", "beams3"])
def test_results_do_not_depend_on_batch_size(engine, params):
    imgs = distinct_images(6)
    one = captions(engine.caption(imgs, params, batch_size=1))
    six = captions(engine.caption(imgs, params, batch_size=6))
    three = captions(engine.caption(imgs, params, batch_size=4))
    assert one == six == three


def test_mixed_prompts_in_one_batch_match_captioning_alone(engine):
    imgs = distinct_images(3)
    prompts = ["a photo of", "a", "a picture taken from far away of"]
    together = captions(engine.caption(imgs, BEAMS3, prompts=prompts, batch_size=3))
    alone = [captions(engine.caption([im], BEAMS3, prompts=p))[0] for im, p in zip(imgs, prompts)]
    assert together == alone


@pytest.fixture(scope="module", params=["fast", "hf"])
def chatty_engine(request, chatty_dir):
    """Each decoder on the checkpoint that suppresses nothing (``support.checkpoints``),
    loaded from disk as a user's model is."""
    return engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": str(chatty_dir), "BLIP_WARMUP": "0", "BLIP_DECODER": request.param}))


@pytest.mark.parametrize("params", checkpoints.MIXES[::3],
                         ids=[checkpoints.mix_id(p) for p in checkpoints.MIXES[::3]])
def test_a_caption_never_depends_on_its_batch(chatty_engine, params):
    # six prompts of different lengths in one batch (left padding), against each image alone,
    # on a model where <pad> and early eos matter; beams 1-10 over the ten mixes
    imgs, prompts = distinct_images(len(checkpoints.PROMPTS)), checkpoints.PROMPTS
    assert chatty_engine.decoder == chatty_engine.cfg.decoder
    together = [r.captions for r in chatty_engine.caption(imgs, params, prompts=prompts,
                                                           batch_size=len(imgs))]
    alone = [chatty_engine.caption([im], params, prompts=p)[0].captions
             for im, p in zip(imgs, prompts)]
    assert together == alone
    assert all(len(c) == params.num_captions for c in together)


def test_caption_excludes_prompt_unless_include_prompt(engine):
    img = distinct_images(1)
    bare = captions(engine.caption(img, GREEDY, prompts="a photo of"))[0]
    full = captions(engine.caption(img, GREEDY, prompts="a photo of", include_prompt=True))[0]
    assert full == f"a photo of {bare}"
    assert not bare.startswith("a photo of")


def test_prompt_changes_the_caption(engine):
    img = distinct_images(1)
    a = captions(engine.caption(img, GREEDY, prompts="a photo of"))[0]
    b = captions(engine.caption(img, GREEDY, prompts="zzz qqq"))[0]
    assert a != b


def test_prompt_text_that_looks_like_a_special_token_is_plain_text(engine):
    ids, _ = engine.build_inputs(["<image> </s> <pad>"])
    assert int((ids == engine.m.image_token_id).sum()) == 32


@pytest.mark.parametrize("max_length", [1, 3, 12])
@pytest.mark.parametrize("min_length", [0, "max"])
def test_max_length_counts_new_tokens(engine, monkeypatch, max_length, min_length):
    min_length = max_length if min_length == "max" else min_length
    rows = record_token_rows(monkeypatch, engine)
    caps = captions(engine.caption(distinct_images(3), GenerationParams(
        num_beams=1, max_length=max_length, min_length=min_length)))
    # The tiny tokenizer is byte level: one token per character of the caption.
    assert len(rows) == 3 and all(len(c) <= max_length for c in caps)
    counts = [caption_token_count(r, engine.m.eos_token_id) for r in rows]
    # a caption stops at its eos or after exactly max_length new tokens, never sooner
    assert all(min_length <= n <= max_length for n in counts), rows
    assert all(n == max_length for r, n in zip(rows, counts) if engine.m.eos_token_id not in r)


def test_min_length_counts_new_tokens_not_the_prompt(engine, monkeypatch):
    long_prompt = "a very long prompt that is much longer than the minimum length asked for"
    rows = record_token_rows(monkeypatch, engine)
    captions(engine.caption(distinct_images(3), GenerationParams(
        num_beams=3, max_length=30, min_length=25), prompts=long_prompt))
    counts = [caption_token_count(r, engine.m.eos_token_id) for r in rows]
    assert len(counts) == 3 and all(25 <= n <= 30 for n in counts), rows


def test_a_caption_may_end_at_min_length_and_not_before(engine, monkeypatch):
    # Greedy: where a caption ends anyway after n tokens, min_length=n changes nothing (its
    # eos comes at the first step allowed) and min_length=n+1 makes it longer.
    eos = engine.m.eos_token_id
    rows = record_token_rows(monkeypatch, engine)

    def count(img, min_length):
        rows.clear()
        captions(engine.caption([img], GenerationParams(
            num_beams=1, max_length=40, min_length=min_length), prompts="an image showing the"))
        return caption_token_count(rows[0], eos)

    imgs = distinct_images(6)
    free = {i: count(img, 0) for i, img in enumerate(imgs)}
    ends = {i: n for i, n in free.items() if 0 < n < 39}  # those that end on their own
    assert len(ends) >= 3, free
    assert {i: count(imgs[i], n) for i, n in ends.items()} == ends
    assert all(count(imgs[i], n + 1) > n for i, n in ends.items())


def test_num_captions_with_beams_and_with_sampling(engine):
    imgs = distinct_images(2)
    beams = engine.caption(imgs, GenerationParams(num_beams=4, num_captions=3))
    assert [len(r.captions) for r in beams] == [3, 3]
    torch.manual_seed(0)
    sampled = engine.caption(imgs, GenerationParams(use_nucleus_sampling=True, num_beams=5,
                                                    num_captions=2, top_p=0.9, temperature=1.0))
    assert [len(r.captions) for r in sampled] == [2, 2]
    assert sampled[0].captions != sampled[1].captions


def test_images_of_any_size_and_mode(engine):
    imgs = [Image.new(mode, size, color) for mode, size, color in
            [("L", (10, 10000), 30), ("RGBA", (1, 1), (1, 2, 3, 4)), ("P", (50, 60), 7),
             ("CMYK", (640, 480), (0, 50, 100, 0)), ("I;16", (30, 20), 1000)]]
    assert len(captions(engine.caption(imgs, GREEDY))) == 5


def test_injected_oom_still_captions_every_image_in_order():
    imgs = distinct_images(6)
    clean = captions(engine_mod.load_engine(tiny_cfg()).caption(imgs, BEAMS3, batch_size=6))
    chaos = engine_mod.load_engine(tiny_cfg(BLIP_INJECT_OOM_ABOVE_BATCH="1", BLIP_WARMUP="0"))
    assert captions(chaos.caption(imgs, BEAMS3, batch_size=6)) == clean


def test_fallback_halves_and_keeps_the_reduced_size(monkeypatch):
    eng = engine_mod.load_engine(tiny_cfg(BLIP_INJECT_OOM_ABOVE_BATCH="2", BLIP_WARMUP="0"))
    tried = record_batches(monkeypatch, eng)
    imgs = distinct_images(7)
    pixels = [eng.preprocess(im) for im in imgs]
    results, size = eng.generate_with_fallback(pixels, ["a photo of"] * 7, GREEDY, 8)
    # 7 and 4 run out of memory; 2 fits and is kept for the rest (the last chunk holds 1)
    assert tried == [7, 4, 2, 2, 2, 1] and size == 2
    assert captions(results) == captions(eng.caption(imgs, GREEDY, batch_size=1))


def test_oom_even_alone_is_a_per_image_error_and_the_rest_go_on(engine, monkeypatch):
    real = engine._generate
    poisoned = distinct_images(3)[1]
    poisoned_px = engine.preprocess(poisoned)

    def flaky(pixels, prompts, params):
        if any(torch.equal(p, poisoned_px) for p in pixels):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixels, prompts, params)

    monkeypatch.setattr(engine, "_generate", flaky)
    tried = record_batches(monkeypatch, engine)
    res = engine.caption(distinct_images(3), GREEDY, batch_size=3)
    assert tried == [3, 1, 1, 1]  # halved to 1 at once; only the poisoned image fails alone
    assert res[0].error is None and res[2].error is None
    assert "out of GPU memory" in res[1].error and "num_beams" in res[1].error


def test_corrupted_cuda_context_is_fatal(engine, monkeypatch):
    def broken(pixels, prompts, params):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "_generate", broken)
    with pytest.raises(FatalDeviceError):
        engine.caption(distinct_images(1), GREEDY)


def test_other_runtime_errors_are_not_mistaken_for_fatal_ones(engine, monkeypatch):
    def broken(pixels, prompts, params):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(engine, "_generate", broken)
    with pytest.raises(RuntimeError) as info:
        engine.caption(distinct_images(1), GREEDY)
    assert not isinstance(info.value, FatalDeviceError)


def test_bfloat16_runs_on_cpu():
    eng = engine_mod.load_engine(tiny_cfg(BLIP_DTYPE="bfloat16", BLIP_WARMUP="0"))
    assert eng.model.language_model.dtype == torch.bfloat16
    assert eng.model.qformer.dtype == torch.float32  # kept in fp32, like from_pretrained
    assert len(captions(eng.caption(distinct_images(2), GREEDY))) == 2


def test_cpu_default_batch_and_explicit_override():
    assert engine_mod.load_engine(tiny_cfg(BLIP_WARMUP="0")).batch_limit(GREEDY) == 8
    eng = engine_mod.load_engine(tiny_cfg(BLIP_MAX_BATCH_SIZE="3", BLIP_WARMUP="0"))
    assert eng.batch_limit(BEAMS3) == 3


def test_result_shape():
    r = CaptionResult(captions=["a", "b"])
    assert r.caption == "a" and CaptionResult(error="x").caption is None


def test_engine_module_does_not_import_runpod():
    import sys
    import subprocess
    code = ("import sys; sys.path.insert(0, 'src'); import engines, modeling, preprocess; "
            "assert 'runpod' not in sys.modules; assert 'transformers.models.blip_2' not in "
            "sys.modules, 'no model code may load at import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_is_the_transformers_engine(engine):
    assert isinstance(engine, TransformersEngine) and engine.name == "transformers"
    assert engine.model_id == "tiny-random" and engine.warmup_s > 0


def test_the_longest_request_the_schema_allows_fits(engine):
    # 300-character prompt + 200 new tokens + 32 query tokens + BOS: within the position table
    res = engine.caption(distinct_images(1), GenerationParams(num_beams=2, max_length=200,
                                                              min_length=200), prompts="x" * 300)
    assert res[0].error is None and len(res[0].caption) >= 195


def test_memory_held_by_the_graph_pool_is_not_counted_as_free():
    from engines.transformers_engine import usable_free_bytes
    gib = 2 ** 30
    # 10 GiB free on the device, 6 GiB reserved by torch of which 2 GiB in use
    assert usable_free_bytes(10 * gib, 6 * gib, 2 * gib, 0) == 14 * gib
    # 3 of the 4 unused reserved GiB are the CUDA graphs' pool: no batch can use them
    assert usable_free_bytes(10 * gib, 6 * gib, 2 * gib, 3 * gib) == 11 * gib
    assert usable_free_bytes(10 * gib, 6 * gib, 2 * gib, 9 * gib) == 10 * gib
