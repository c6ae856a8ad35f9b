"""The fast decoder's switches, in one object. The engine builds it from its Config and the
device (``engines.decode_options``); the benchmark passes its variants' in (``fast-base``, and
scripts comparing one switch). The defaults are a CPU's, with every optimisation that is not
CUDA-only switched on."""
from __future__ import annotations

from dataclasses import dataclass

CUDNN_CHOICES = ("vision", "all")


@dataclass(frozen=True)
class DecodeOptions:
    # capture each batch shape's decoding step once as a CUDA graph and replay it (CUDA only)
    cuda_graphs: bool = False
    # Bucketing (padding batches and prompts to fixed shapes) is what lets graphs be reused,
    # and graphs always do it. This pads eager batches too: tests check that padding changes
    # nothing, and the self-check's reference runs at the graphs' padded shapes.
    bucket: bool = False
    graph_memory_bytes: int = 0  # the most the workspaces kept for graph replay may take
    # overlap: queue step t's decoder pass before reading whether the search stopped at t
    # (one wasted pass at the end instead of a host/GPU round trip at every step)
    overlap: bool = True
    # image encoding + prompt prefill replayed from a CUDA graph too, for small batches
    encode_graphs: bool = True
    fuse_qkv: bool = True  # one q/k/v matmul per decoder layer (see opt.OptModel._fused_qkv)
    # cuDNN's attention (PyTorch's first choice on an H100) builds a plan for every new batch
    # size, at every call site, the first time it meets it: a batch of a size not met before
    # paid that plan in the image encoder, the Q-Former and the prefill. Only the image encoder
    # ("vision") keeps it, where it is faster than flash attention at large batches; the
    # Q-Former and the prefill, whose attention is a small share of their time, use the other
    # kernels. "all" leaves PyTorch's choice everywhere (benchmarks compare the two; the
    # measurements are in OPTIMIZATION.md).
    cudnn_attention: str = "vision"

    def __post_init__(self):
        if self.cudnn_attention not in CUDNN_CHOICES:
            raise ValueError(f"cudnn_attention must be one of {CUDNN_CHOICES}, "
                             f"not {self.cudnn_attention!r}")
