"""CUDA-only checks, run by `make test-gpu` / scripts/gpu_check.sh on a GPU machine (the `gpu`
marker is deselected in `make test`, which runs on CPU). They check what the CPU cannot: the
fast decoder's CUDA graphs give the same tokens as eager decoding and as transformers'
generate, and the CUDA code paths (pinned memory, fp16, OOM fallback) work."""
import pytest
import torch

import config
import engines as engine_mod
import generation
import preprocess
import testing_models
from params import GenerationParams as G
from support.images import distinct_images

pytestmark = pytest.mark.gpu

PARAMS = [G(num_beams=1, max_length=12, min_length=3), G(num_beams=3, max_length=12, min_length=3),
          G(num_beams=3, max_length=10, num_captions=2, repetition_penalty=1.3)]


def cuda_engine(**env):
    if not torch.cuda.is_available():
        pytest.fail("test_gpu.py needs a CUDA device (run it with `make test-gpu` on a GPU box)")
    return engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": "tiny-random", "BLIP_DEVICE": "cuda", "BLIP_WARMUP": "0", **env}))


@pytest.mark.parametrize("images", [1, 3, 6])
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "beams3", "beams3x2-rep"])
def test_cuda_graphs_give_transformers_tokens(images, params):
    hf = cuda_engine(BLIP_DTYPE="float32", BLIP_DECODER="hf")
    fast = cuda_engine(BLIP_DTYPE="float32", BLIP_DECODER="fast", BLIP_CUDA_GRAPHS="1")
    imgs = distinct_images(images)
    prompts = ["a photo of", "a", "an image of the"] * 2
    want = [r.captions for r in hf.caption(imgs, params, prompts=prompts[:images])]
    for _ in range(2):  # the second call replays the cached graph
        got = [r.captions for r in fast.caption(imgs, params, prompts=prompts[:images])]
        assert got == want
    assert fast.fast.graph_replays > 0 and fast.fast.graph_failures == 0
    # batches of up to 16 images also replay image encoding + prefill from a graph
    assert fast.fast.encode_replays > 0 and fast.fast.encode_failures == 0


def test_graphs_equal_eager_on_the_full_architecture_in_fp16():
    if not torch.cuda.is_available():
        pytest.fail("needs CUDA")
    loaded = testing_models.load_model("random-full", torch.device("cuda"), torch.float16)
    px = torch.stack([preprocess.to_uint8(im) for im in distinct_images(3)]).cuda()
    px = preprocess.normalize(px, torch.float16)
    tok = loaded.tokenizer
    rows = [[loaded.image_token_id] * 32 + tok("a photo of").input_ids] * 3
    ids = torch.tensor(rows, device="cuda")
    mask = torch.ones_like(ids)
    p = G(num_beams=3, max_length=12, min_length=12)
    eager = generation.FastGenerator(loaded.model, loaded.eos_token_id, loaded.pad_token_id,
                                     generation.DecodeOptions(cuda_graphs=False, bucket=True))
    graphs = generation.FastGenerator(loaded.model, loaded.eos_token_id, loaded.pad_token_id,
                                      generation.DecodeOptions(cuda_graphs=True,
                                                               graph_memory_bytes=2 ** 32))
    assert graphs.generate(px, ids, mask, p) == eager.generate(px, ids, mask, p)
    assert graphs.graph_replays > 0 and graphs.encode_replays > 0
    del loaded, eager, graphs
    torch.cuda.empty_cache()


def test_fp16_engine_on_cuda_with_injected_oom_captions_everything():
    clean = cuda_engine()
    chaos = cuda_engine(BLIP_INJECT_OOM_ABOVE_BATCH="1")
    imgs = distinct_images(5)
    p = G(num_beams=3, max_length=10)
    assert clean.dtype == torch.float16
    # batch 1 on both sides: the injected run falls back to batch 1, and fp16 GEMMs of other
    # shapes may round differently
    want = [r.captions for r in clean.caption(imgs, p, batch_size=1)]
    assert [r.captions for r in chaos.caption(imgs, p, batch_size=5)] == want
    assert clean.release_memory()["reserved_gib"] >= 0


def test_images_are_staged_in_pinned_memory_and_stacked_on_the_gpu():
    eng = cuda_engine()
    imgs = distinct_images(4)
    pixels = [eng.preprocess(im) for im in imgs]
    assert all(p.is_pinned() for p in pixels)
    batch = eng.collate(pixels)
    assert batch.is_cuda and torch.equal(batch.cpu(), torch.stack(pixels))
    p = G(num_beams=3, max_length=10)
    staged = [r.captions for r in eng.caption(imgs, p)]
    eng.device_collate = False  # the host path: stack, pin and copy the batch
    assert [r.captions for r in eng.caption(imgs, p)] == staged

