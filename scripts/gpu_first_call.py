"""Why is the first batch of a new size slow? (GPU) Times the image encoder's first and second
call at batch sizes it has not met, with cuDNN's attention (PyTorch's default choice on an H100)
and with it switched off (flash attention then), and its steady time at batch 64 and 256 with
each; then the bench's 64 concurrent one-image jobs with each (cuDNN on or off everywhere).
With --where, instead: the bench's 64 concurrent jobs and 512-image job with cuDNN attention
everywhere (PyTorch's choice) and only in the image encoder (DecodeOptions.cudnn_attention).
    python scripts/gpu_first_call.py [random-full|tiny-random] [--where]"""
import json
import sys
import time

sys.path.insert(0, "src")
import torch  # noqa: E402

import bench  # noqa: E402
import testing_models  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "random-full"
if "--where" in sys.argv:
    for where in ("all", "vision"):
        print(json.dumps({"cudnn_attention": where}), flush=True)
        decode = {"cudnn_attention": where}
        bench.main(["--model", model, "--mode", "concurrent", "--images", "64"], decode)
        bench.main(["--model", model, "--mode", "job", "--images", "512"], decode)
    sys.exit(0)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.float16 if dev.type == "cuda" else torch.float32
m = testing_models.load_model(model, dev, dtype)
vm = m.model.vision_model


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def once(b: int) -> float:
    x = torch.randn(b, 3, 364, 364, device=dev, dtype=dtype)
    sync()
    t = time.perf_counter()
    vm(x)
    sync()
    return round(1000 * (time.perf_counter() - t), 1)


def cudnn(on: bool) -> None:
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(on)


with torch.inference_mode():
    once(1)  # the process's first call (kernels loaded), not counted
    for label, on, sizes in (("cudnn", True, (3, 5, 24, 40)), ("no-cudnn", False, (6, 7, 28, 44))):
        cudnn(on)
        for b in sizes:
            first, second = once(b), once(b)
            print(json.dumps({"attention": label, "batch": b, "first_ms": first,
                              "second_ms": second}), flush=True)
    for b in (64, 256):
        for label, on in (("cudnn", True), ("no-cudnn", False)):
            cudnn(on)
            once(b)
            runs = sorted(once(b) for _ in range(3))
            print(json.dumps({"attention": label, "batch": b, "steady_ms": runs[1]}), flush=True)
del m, vm
cudnn(True)
for label, on in (("cudnn", True), ("no-cudnn", False)):
    cudnn(on)
    print(json.dumps({"concurrent_attention": label}), flush=True)
    bench.main(["--model", model, "--mode", "concurrent", "--images", "64"])
