"""The fixed-shape buffers of the fast decoder: what a decoding step (and a CUDA graph of it)
reads and writes, and what the prefill hands to the search."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prefix:
    valid: torch.Tensor  # (B,) prompt tokens that are not padding
    logits: torch.Tensor  # (B, V) float32: next-token logits after the prompt


@dataclass(eq=False)
class Workspace:
    """Fixed-shape buffers one decoding step reads and writes (what a CUDA graph captures)."""
    images: int  # capacity in images (a real batch may use fewer; the rest are padding)
    per_image: int  # rows per image (beams or samples)
    length: int  # prompt length (left-padded)
    steps: int  # new tokens at most
    prefix: torch.Tensor  # (2 x layers, images, H, length, d): keys then values, per layer
    prefix_bias: torch.Tensor  # (images, 1, 1, length)
    gen: torch.Tensor  # (layers, 2, images, H, per_image, steps, d), zero: generated K, V
    gen_bias: torch.Tensor  # (1, 1, 1, steps): 0 up to the current step, -inf after
    tokens: torch.Tensor  # (rows,)
    positions: torch.Tensor  # (rows,)
    t_index: torch.Tensor  # (1,) the current step
    logits: torch.Tensor  # (rows, V) float32, written by the step
    graph: object = None
    bytes: int = 0
    bias_table: torch.Tensor = field(default=None)  # (steps, 1, 1, 1, steps)
    encoder: "EncodeGraph | None" = None

    def follow_beams(self, parents: torch.Tensor, t: int) -> None:
        """Beam search's reordering: each row's first ``t`` generated keys and values become
        those of its parent beam (``parents``: (images, beams), real images only), all layers
        at once."""
        b, k = parents.shape
        hist = self.gen[:, :, :b, :, :, :t]
        parents = parents.view(1, 1, b, 1, k, 1, 1).expand(hist.shape)
        hist.copy_(hist.gather(4, parents))


@dataclass(eq=False)
class EncodeGraph:
    """Static inputs and outputs of a captured image encoding + prompt prefill."""
    pixels: torch.Tensor  # (images, 3, S, S) normalised
    ids: torch.Tensor  # (images, length) left-padded to the workspace's prompt length
    mask: torch.Tensor
    valid: torch.Tensor  # (images,) outputs, copied in by the graph
    logits: torch.Tensor  # (images, V) float32
    graph: object = None
