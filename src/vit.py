"""The BLIP-2 image encoder (ViT-g, 39 layers at 364 px) run as one layer function.

transformers' ``Blip2VisionModel`` calls 39 ``Blip2EncoderLayer`` modules. ``VisionEncoder``
computes the same thing with one plain function, ``encoder_layer``, applied to each layer's
parameters in turn: layer norm, fused q/k/v projection, scaled-dot-product attention, output
projection, residual, layer norm, MLP (exact GELU), residual. Eager, it gives transformers'
output (tested). Its point is ``compile=True``: ``torch.compile`` then traces one layer once and
all 39 layers reuse the compiled code (the parameters are inputs, not constants), so the
element-wise work between the matrix products (norms, bias + GELU, residual adds, the head
transposes) runs as a few fused kernels instead of a dozen. The batch dimension is compiled
as dynamic: one compiled graph for every batch size above 1 (``warm`` compiles it before the
first job). Compiled kernels reorder floating-point sums, so results match eager to rounding,
not bit for bit.

No model is built or compiled at import.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("blip.vit")


def encoder_layer(x: torch.Tensor, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b,
                  ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b,
                  heads: int, eps: float, scale: float) -> torch.Tensor:
    """One pre-norm ViT block, (B, T, D) -> (B, T, D), as ``Blip2EncoderLayer`` computes it."""
    b, t, d = x.shape
    h = F.layer_norm(x, (d,), ln1_w, ln1_b, eps)
    qkv = F.linear(h, qkv_w, qkv_b).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=scale)
    x = F.linear(a.transpose(1, 2).reshape(b, t, d), proj_w, proj_b) + x
    h = F.layer_norm(x, (d,), ln2_w, ln2_b, eps)
    return F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b) + x


def supports(vision_model) -> bool:
    """The layer function covers transformers' BLIP-2 vision layers with exact GELU and no
    hooks (offloaded or otherwise wrapped modules keep transformers' own forward)."""
    try:
        layers = vision_model.encoder.layers
        cfg = vision_model.config
    except AttributeError:
        return False
    if cfg.hidden_act != "gelu" or not len(layers):
        return False
    for layer in layers:
        try:
            (layer.layer_norm1, layer.self_attn.qkv, layer.self_attn.projection,
             layer.layer_norm2, layer.mlp.fc1, layer.mlp.fc2)
        except AttributeError:
            return False
        if any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks
               for m in layer.modules()):
            return False
        if any(p.is_meta for p in layer.parameters()):
            return False
    return True


class VisionEncoder:
    """``pixel_values`` -> the vision model's ``last_hidden_state`` (post layer norm)."""

    def __init__(self, vision_model, compile: bool = False):
        self.vm = vision_model
        cfg = vision_model.config
        self.heads = cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps
        self.scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
        self.compiled = compile
        self.compile_s = 0.0
        self._layer = (torch.compile(encoder_layer, fullgraph=True, dynamic=None)
                       if compile else encoder_layer)

    def _params(self, layer) -> tuple:
        a, mlp = layer.self_attn, layer.mlp
        return (layer.layer_norm1.weight, layer.layer_norm1.bias, a.qkv.weight, a.qkv.bias,
                a.projection.weight, a.projection.bias, layer.layer_norm2.weight,
                layer.layer_norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                mlp.fc2.bias)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vm.embeddings(pixel_values)
        if self.compiled and x.shape[0] > 1:
            # one graph for every batch size > 1 (batch 1 gets its own, specialised one)
            torch._dynamo.maybe_mark_dynamic(x, 0)
        for layer in self.vm.encoder.layers:
            x = self._layer(x, *self._params(layer), heads=self.heads, eps=self.eps,
                            scale=self.scale)
        return self.vm.post_layernorm(x)

    def warm(self, device: torch.device, dtype: torch.dtype, image_size: int) -> float:
        """Compile now (batch 1 and the dynamic batch graph), not in the first job."""
        if not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in (1, 2):
                self(torch.zeros(n, 3, image_size, image_size, device=device, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.compile_s += time.perf_counter() - t0
        log.info("vision encoder compiled in %.1fs", self.compile_s)
        return self.compile_s
