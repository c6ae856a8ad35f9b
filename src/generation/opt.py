"""BLIP-2 with an OPT decoder, as the fast decoder runs it: the image and prompt embeddings, the
prefill of a prompt, and one decoding step over the layers on a workspace's buffers (the
attention of a step reads its image's shared prompt cache, then the row's own tokens).

Supported: OPT decoders with ``do_layer_norm_before`` (every BLIP-2 OPT checkpoint)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .options import DecodeOptions
from .workspace import Prefix, Workspace

# the attention kernels of the Q-Former and the prefill (DecodeOptions.cudnn_attention)
_NO_CUDNN = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def supports(model) -> bool:
    """True for BLIP-2 models whose language model is an OPT decoder this module can run."""
    lm = getattr(model, "language_model", None)
    cfg = getattr(lm, "config", None)
    return (getattr(cfg, "model_type", None) == "opt" and cfg.do_layer_norm_before
            and getattr(cfg, "activation_function", "relu") == "relu"
            and lm.model.decoder.project_in is None and lm.model.decoder.project_out is None)


class OptModel:
    """The model math, with no state of its own beyond the model, its fused projections and
    the choice of attention kernels."""

    def __init__(self, model, options: DecodeOptions):
        self.model = model
        self.lm = model.language_model
        self.decoder = self.lm.model.decoder
        cfg = self.lm.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self._qkv = [self._fused_qkv(layer.self_attn) if options.fuse_qkv else None
                     for layer in self.decoder.layers]
        self.cudnn_attention = options.cudnn_attention

    def _attention_without_cudnn(self):
        return (contextlib.nullcontext() if self.cudnn_attention == "all"
                else sdpa_kernel(list(_NO_CUDNN)))

    @staticmethod
    def _fused_qkv(attn) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One (3H, H) weight for q, k and v, so a layer projects with one matmul instead of
        three. The three modules' parameters become views into it: no extra memory, and
        transformers' own forward sees the same values. None where the layout does not allow
        it (no biases, mixed devices or dtypes, offloaded or hooked modules)."""
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        cached = getattr(attn, "_fused_qkv", None)
        if cached is not None and cached[0].data_ptr() == attn.q_proj.weight.data_ptr():
            return cached
        weights, biases = [p.weight for p in projs], [p.bias for p in projs]
        if (any(b is None for b in biases) or any(hasattr(p, "_hf_hook") for p in projs)
                or len({(t.device, t.dtype) for t in weights + biases}) != 1
                or weights[0].is_meta):
            return None
        with torch.no_grad():
            w, b = torch.cat(weights).contiguous(), torch.cat(biases).contiguous()
        n = weights[0].shape[0]
        for j, p in enumerate(projs):
            grad = p.weight.requires_grad
            p.weight = torch.nn.Parameter(w[j * n:(j + 1) * n], requires_grad=grad)
            p.bias = torch.nn.Parameter(b[j * n:(j + 1) * n], requires_grad=grad)
        attn._fused_qkv = (w, b)
        return w, b

    def _project(self, i: int, attn, x: torch.Tensor):
        """q (scaled), k, v of layer ``i`` for hidden states ``x``."""
        fused = self._qkv[i]
        if fused is None:
            return attn.q_proj(x) * attn.scaling, attn.k_proj(x), attn.v_proj(x)
        q, k, v = F.linear(x, *fused).chunk(3, dim=-1)
        return q * attn.scaling, k, v

    # --- the model, step by step ----------------------------------------------------------
    def _prompt_embeds(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        image = m.vision_model(pixel_values, return_dict=True).last_hidden_state
        queries = m.query_tokens.expand(image.shape[0], -1, -1)
        # transformers keeps the Q-Former in fp32; LAVIS runs it under fp16 autocast. On CUDA
        # in half precision, so do we: its matmuls in half precision, norms in fp32.
        half = image.is_cuda and image.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast("cuda", dtype=image.dtype, enabled=half,
                            cache_enabled=False), self._attention_without_cudnn():
            q = m.qformer(query_embeds=queries, encoder_hidden_states=image,
                          encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long,
                                                            device=image.device),
                          return_dict=True).last_hidden_state
        projected = m.language_projection(q.to(image.dtype))
        embeds = self.decoder.embed_tokens(input_ids)
        # the n-th <image> slot of a row takes the n-th query embedding (what masked_scatter
        # does, written as a gather: no data-dependent sizes, so a CUDA graph can record it)
        slots = input_ids == m.config.image_token_index
        index = (slots.cumsum(1) - 1).clamp(min=0)
        picked = projected.to(embeds.dtype).gather(
            1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        return torch.where(slots[..., None], picked, embeds)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, H*d) -> (N, H, T, d)"""
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.head_dim).transpose(1, 2)

    def _mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        x = layer.final_layer_norm(h)
        return h + layer.fc2(F.relu(layer.fc1(x)))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.decoder.final_layer_norm(h) if self.decoder.final_layer_norm is not None else h
        return self.lm.lm_head(h).float()

    def prefill(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, ws: Workspace) -> Prefix:
        """Run the prompt (left-padded to the workspace's length) once per image, writing its
        keys/values into ``ws``."""
        embeds = self._prompt_embeds(pixel_values, input_ids)
        b, length = input_ids.shape
        assert length == ws.length, "prompt and workspace lengths differ"
        layers = len(self.decoder.layers)
        mask = attention_mask.bool()
        positions = (attention_mask.cumsum(1) * attention_mask - 1).long()
        h = embeds + self.decoder.embed_positions(attention_mask, 0, position_ids=positions)
        # causal & not padding; every row may see itself so no softmax row is empty
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        allowed = causal[None] & mask[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=h.device)[None]
        attn_mask = allowed[:, None]  # (B, 1, L, L)
        with self._attention_without_cudnn():
            for i, layer in enumerate(self.decoder.layers):
                a = layer.self_attn
                x = layer.self_attn_layer_norm(h)
                q, k, v = (self._split(y) for y in self._project(i, a, x))
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
                h = h + a.out_proj(o.transpose(1, 2).reshape(b, length, -1))
                h = self._mlp(layer, h)
                ws.prefix[i, :b] = k
                ws.prefix[layers + i, :b] = v
        ws.prefix_bias[:b] = 0
        ws.prefix_bias[:b].masked_fill_(~mask[:, None, None, :], float("-inf"))
        ws.prefix_bias[b:] = 0  # padding images: finite, never read back
        return Prefix(attention_mask.sum(1), self._logits(h[:, -1]))

    def _step_static(self, ws: Workspace) -> None:
        """Feed ``ws.tokens`` (one per row) at step ``ws.t_index``; write ``ws.logits``.
        Only fixed-shape tensor work: this is what a CUDA graph records."""
        h = self.decoder.embed_tokens(ws.tokens)[:, None]
        h = h + self.decoder.embed_positions(None, 0, position_ids=ws.positions[:, None])
        for i, layer in enumerate(self.decoder.layers):
            a = layer.self_attn
            x = layer.self_attn_layer_norm(h)
            q, kv = self._project_step(i, a, x, ws.per_image)
            ws.gen[i].index_copy_(4, ws.t_index, kv)  # keys and values in one copy
            o = self._attend(q, ws, i)
            h = h + a.out_proj(o)
            h = self._mlp(layer, h)
        ws.logits.copy_(self._logits(h[:, 0]))

    def _project_step(self, i: int, attn, x: torch.Tensor,
                      per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For one new token per row (rows image-major, ``x``: (R, 1, H*d)): q as
        (B, H, k, d) and the new keys and values as (2, B, H, k, 1, d), views where the fused
        projection allows (what ``ws.gen[i]`` takes with one ``index_copy_``)."""
        rows, heads, d = x.shape[0], self.heads, self.head_dim
        fused = self._qkv[i]
        if fused is None:
            q, k, v = self._project(i, attn, x)
            kv = torch.stack([k, v], 2)  # (R, 1, 2, H*d)
        else:
            qkv = F.linear(x, *fused)  # (R, 1, 3*H*d)
            q = qkv[..., :heads * d] * attn.scaling
            kv = qkv[..., heads * d:]
        k = per_image
        q = q.view(rows // k, k, heads, d).transpose(1, 2)
        kv = kv.reshape(rows // k, k, 2, heads, d).permute(2, 0, 3, 1, 4).unsqueeze(4)
        return q, kv

    def _attend(self, q: torch.Tensor, ws: Workspace, i: int) -> torch.Tensor:
        """Attention of one new token per row over its image's shared prompt cache and its own
        generated tokens, with one softmax over both; all in the (image, head, beam) layout,
        so only the result is transposed back to rows."""
        layers = len(self.decoder.layers)
        keys, values = ws.gen[i, 0], ws.gen[i, 1]  # (B, H, k, T, d)
        s_prefix = q @ ws.prefix[i].transpose(-1, -2) + ws.prefix_bias  # (B, H, k, L)
        s_gen = (q.unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2) + ws.gen_bias
        p = torch.cat([s_prefix, s_gen], dim=-1).softmax(-1, dtype=torch.float32).to(q.dtype)
        out = p[..., :ws.length] @ ws.prefix[layers + i]  # (B, H, k, d)
        out = out + (p[..., ws.length:].unsqueeze(-2) @ values).squeeze(-2)
        return out.transpose(1, 2).reshape(ws.images * ws.per_image, 1, -1)
