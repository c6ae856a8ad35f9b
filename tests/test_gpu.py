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
        {"BLIP_MODEL": "tiny-random", "BLIP_DEVICE": "cuda", "BLIP_WARMUP": "0",
         "BLIP_SELF_CHECK": "0", **env}))


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



def test_graphs_are_captured_while_another_thread_pins_memory():
    # the decode threads pin host memory for every image while the GPU thread captures; under
    # torch's default "global" capture mode that allocation fails, and so does the capture
    import threading
    eng = cuda_engine(BLIP_DTYPE="float32")
    ref = cuda_engine(BLIP_DTYPE="float32", BLIP_CUDA_GRAPHS="0")
    imgs = distinct_images(20)
    p = G(num_beams=3, max_length=10)
    stop, pinned, errors = threading.Event(), [0], []

    def pin_in_a_loop():
        while not stop.is_set():
            try:
                eng.preprocess(imgs[pinned[0] % len(imgs)])
                torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
                pinned[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))
    thread = threading.Thread(target=pin_in_a_loop)
    thread.start()
    try:
        got = [eng.caption(imgs[:n], p) for n in (1, 3, 5, 9, 17, 20)]  # new shapes: captures
    finally:
        stop.set()
        thread.join()
    want = [ref.caption(imgs[:n], p) for n in (1, 3, 5, 9, 17, 20)]
    assert not errors and pinned[0] > 0
    assert [[r.captions for r in batch] for batch in got] == \
        [[r.captions for r in batch] for batch in want]
    assert all(r.error is None for batch in got for r in batch)
    assert eng.fast.cuda_graphs and eng.fast.graph_failures == 0 and eng.fast.encode_failures == 0
    assert eng.fast.graph_replays > 0 and eng.fast.pool_bytes > 0


def test_the_self_check_passes_on_cuda_and_turns_graphs_off_on_an_injected_mismatch():
    ok = cuda_engine(BLIP_SELF_CHECK="1")
    assert ok.self_check.ok and ok.fast.cuda_graphs, ok.self_check.text
    print(ok.self_check.text)  # its time, in the log of scripts/gpu_check.sh
    bad = cuda_engine(BLIP_SELF_CHECK="1", BLIP_INJECT_DECODER_MISMATCH="graphs")
    assert bad.self_check.text.startswith("self-check: CUDA graphs gave other tokens ("), \
        bad.self_check.text
    assert bad.self_check.text.endswith("graphs off")
    assert bad.decoder == "fast" and not bad.fast.cuda_graphs
    imgs, p = distinct_images(3), G(num_beams=3, max_length=10)
    assert [r.captions for r in bad.caption(imgs, p)] == [r.captions for r in ok.caption(imgs, p)]


def test_the_self_check_on_the_full_architecture_in_fp16():
    eng = cuda_engine(BLIP_MODEL="random-full", BLIP_SELF_CHECK="1")
    print(eng.self_check.text)  # the figure for OPTIMIZATION.md (budget: about 2 s)
    assert eng.self_check.ok and eng.fast.cuda_graphs, eng.self_check.text
    del eng
    torch.cuda.empty_cache()


def test_once_graphs_are_off_batches_run_at_their_exact_shape():
    eng = cuda_engine(BLIP_DTYPE="float32")
    eng.fast.graphs_off()
    shapes = []
    real = eng.fast._new_workspace
    eng.fast._new_workspace = lambda *a: shapes.append(a[:3]) or real(*a)
    eng.caption(distinct_images(17), G(num_beams=1, max_length=6), prompts="a photo of the")
    assert shapes and all(images == 17 for images, _, _ in shapes)
    assert eng.fast.graph_replays == 0


def test_an_out_of_memory_error_in_the_warm_up_reaches_the_fallback_and_decoding_goes_on():
    eng = cuda_engine(BLIP_DTYPE="float32")
    gen = eng.fast

    def warm_up():
        torch.ones(1 << 20, device="cuda").mul_(2)  # work queued on the side stream
        raise torch.OutOfMemoryError("injected in the warm-up")
    with pytest.raises(torch.OutOfMemoryError):
        gen._capture(warm_up, lambda: None, lambda: None)
    assert gen.graph_failures == 0  # not counted as a capture failure
    imgs, p = distinct_images(3), G(num_beams=3, max_length=10)
    ref = cuda_engine(BLIP_DTYPE="float32", BLIP_CUDA_GRAPHS="0")
    assert [r.captions for r in eng.caption(imgs, p)] == [r.captions for r in ref.caption(imgs, p)]


def test_the_graph_pool_lowers_the_batch_limit():
    eng = cuda_engine()
    p = G(num_beams=3, max_length=30)
    eng.caption(distinct_images(4), p)  # captures graphs: their pool holds memory
    assert eng.fast.pool_bytes > 0
    with_pool = eng.batch_limit(p)
    pool, eng.fast.pool_bytes = eng.fast.pool_bytes, 0
    without = eng.batch_limit(p)
    eng.fast.pool_bytes = pool
    assert with_pool <= without
