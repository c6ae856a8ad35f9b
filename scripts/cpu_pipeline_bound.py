"""How close can a 256-image zip get to the pure decode + preprocess rate when the model runs on
the same CPU? (issue 6's CPU pipeline target: >= 0.8.) Prints JSON lines.

On a CPU the worker's captioning and its decoding share the cores, so the best ratio is
caption_rate / (decode_rate + caption_rate). This measures, with the same images and threads as
``bench.py --mode pipeline`` (640x480 JPEGs, batch 64, beams 3, 12 tokens):

- ``decode``: decode + resize to 364 px, ``DECODE_WORKERS`` threads (pure rate);
- ``caption``: tiny-random captioning alone (the engine's ``generate_batch``);
- ``input_floor``: only what any BLIP-2 at 364 px must do with a batch before its first
  transformer layer: uint8 -> float, CLIP normalisation and the 14 px patch embedding (here
  with the tiny model's 32 channels; the real ViT-g has 1408). A model that cost nothing past
  its patch embedding would caption at this rate at best;

and the best ratios that the tiny model and that such a free model allow.
    python scripts/cpu_pipeline_bound.py [--images 256] [--rounds 3]"""
import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, "src")
import torch  # noqa: E402

import bench  # noqa: E402
import config  # noqa: E402
import engines as engine_mod  # noqa: E402
import inputs  # noqa: E402
import preprocess  # noqa: E402
from params import GenerationParams  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=256)
p.add_argument("--rounds", type=int, default=3)
args = p.parse_args()

cfg = config.Config.from_env({"BLIP_MODEL": "tiny-random", "BLIP_MAX_BATCH_SIZE": "64"})
eng = engine_mod.load_engine(cfg)
jpegs = bench.synthetic_jpegs(args.images, (640, 480))
params = GenerationParams(num_beams=3, max_length=12, min_length=12)
embed = eng.model.vision_model.embeddings
batch = 64


def rate(fn) -> float:
    fn()  # first-use allocations
    t0 = time.perf_counter()
    fn()
    return args.images / (time.perf_counter() - t0)


with ThreadPoolExecutor(cfg.decode_threads) as pool:
    for round_ in range(1, args.rounds + 1):
        pixels: list = []

        def pure(data):  # what bench.py's pipeline mode times as the pure rate
            src = inputs.ImageSource((0, 0), "x", lambda d=data: io.BytesIO(d))
            return eng.preprocess(inputs.decode_image(src, cfg, eng.image_size))

        def decode_all():
            pixels[:] = pool.map(pure, jpegs)

        def batches():
            return [eng.collate(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]

        def caption_all():
            for b in batches():
                eng.generate_batch(b, [""] * len(b), params)

        def input_floor():
            with torch.inference_mode():
                for b in batches():
                    embed(preprocess.normalize(b, eng.dtype))

        d, c, f = rate(decode_all), rate(caption_all), rate(input_floor)
        print(json.dumps({
            "mode": "cpu_pipeline_bound", "round": round_, "images": args.images, "decode_threads": cfg.decode_threads,
            "torch_threads": torch.get_num_threads(), "decode_per_s": round(d, 1),
            "caption_per_s": round(c, 1), "input_floor_per_s": round(f, 1),
            "best_ratio_tiny_random": round(c / (d + c), 3),
            "best_ratio_free_model": round(f / (d + f), 3),
            "device": bench._device_name(eng.device), "date": time.strftime("%Y-%m-%d")}),
            flush=True)
