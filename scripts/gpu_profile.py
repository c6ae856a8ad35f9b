"""Where does one image's time go? (GPU) Times the stages of the fast decoder at batch 1, 16
and 64, beams 3, 12 forced tokens, on random-full, and
prints the top CUDA and CPU ops of one batch-1 generate and the top CUDA ops of the eager image
encoder at batch 64.  python scripts/gpu_profile.py"""
import sys, time, json
sys.path.insert(0, "src")
import torch
import testing_models, preprocess, generation
from params import GenerationParams as G
dev = torch.device("cuda")
m = testing_models.load_model("random-full", dev, torch.float16)
gen = generation.FastGenerator(m.model, m.eos_token_id, m.pad_token_id,
                               generation.DecodeOptions(cuda_graphs=True, graph_memory_bytes=2**32))
tok = m.tokenizer
def inputs(b):
    px = preprocess.normalize(torch.randint(0, 255, (b, 3, 364, 364), dtype=torch.uint8, device=dev), torch.float16)
    ids = torch.tensor([[m.image_token_id] * 32 + tok("a photo of").input_ids] * b, device=dev)
    return px, ids, torch.ones_like(ids)
p = G(num_beams=3, max_length=12, min_length=12)
def timed(fn, n=5):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return round(1000 * sorted(ts)[n // 2], 2)
with torch.inference_mode():
    for b in (1, 16, 64):
        px, ids, mask = inputs(b)
        ws = gen._workspace(b, 3, ids.shape[1], 12, m.model.language_model.lm_head.weight)
        r = {"batch": b,
             "vision_ms": timed(lambda: m.model.vision_model(px)),
             "embeds_ms": timed(lambda: gen._prompt_embeds(px, ids)),
             # image encoding + prefill as generate runs it (a CUDA graph up to 16 images)
             "encode_ms": timed(lambda: gen._encode(px, ids, mask, ws)),
             "generate_ms": timed(lambda: gen.generate(px, ids, mask, p)),
             "encode_graphs": gen.encode_replays > 0}
        print(json.dumps(r), flush=True)
    px, ids, mask = inputs(1)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen.generate(px, ids, mask, p); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    px, ids, mask = inputs(64)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.model.vision_model(px); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
