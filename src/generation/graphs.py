"""Fast caption decoding for BLIP-2 OPT: the same search as transformers' ``generate``, with
less work per image.

What transformers' generate does for ``num_beams=k`` (and for ``num_captions`` samples): it
copies every image's prompt (32 query embeddings + BOS + prompt) k times *before* the prefill,
runs the prefill k times, keeps k copies of the prompt's KV cache, and per decoding step reads
all of them, concatenating a growing cache. Here instead:

- the prompt is prefilled **once per image**; its KV cache is kept once per image and shared by
  the image's beams (the attention of each step reads the shared prefix with one batched matmul
  per image, then the beam's own generated tokens);
- generated tokens live in a preallocated buffer (no per-step concatenation); beam reordering
  copies only the generated part;
- per step, one Python loop over the decoder layers on preallocated, fixed-shape buffers (no
  cache objects, no mask building), which on CUDA is captured once as a CUDA graph per batch
  shape and replayed (``cuda_graphs``): a small batch's step costs one launch instead of ~900.

The search itself is the one transformers runs, so results are the same tokens: greedy
(argmax), beam search (top 2k candidates per image over accumulated log-probs, the first k
that end are finalised with score / generated_len ** length_penalty, transformers' default
early-stopping heuristic, best ``num_captions`` returned), and nucleus sampling (temperature,
then top-k 50 (transformers' default), then top-p, multinomial). Logits processing matches transformers' order and semantics:
repetition penalty over the whole row (prompt included), ``min_new_tokens`` bans eos,
``suppress_tokens`` from the model's generation config. A test compares the tokens with
``model.generate`` on the tiny model (greedy and beams, mixed prompt lengths).

Supported: OPT decoders with ``do_layer_norm_before`` (every BLIP-2 OPT checkpoint). Anything
else falls back to transformers' generate (``supports(model)``).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from params import GenerationParams

NEG = -1.0e9  # transformers' "impossible" score
SAMPLING_TOP_K = 50  # transformers' default top_k, which LAVIS's sampling inherits too
# Image counts a graph is captured for (a batch is padded up to the next one); batches whose
# step buffers exceed the graph memory budget run eagerly at their exact size.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
GRAPH_PROMPT_MULTIPLE = 8  # prompt lengths are left-padded to a multiple of this for graphs
# Image encoding + prompt prefill is graphed too for batches up to this many images: there the
# GPU work is small and launching ~1,500 kernels one by one is what costs the time.
ENCODE_GRAPH_MAX_IMAGES = 16
# cuDNN's attention (PyTorch's first choice on an H100) builds a plan for every new batch size:
# ~70-85 ms per call site the first time (H100 run 10), so a batch of a size not met before
# paid ~370 ms more across the image encoder, the Q-Former and the prefill. Only the image
# encoder keeps it, where it is ~5% faster than flash attention at large batches; the Q-Former
# and the prefill, whose attention is a small share of their time, use the other kernels.
# "all" leaves PyTorch's choice everywhere (benchmarks compare the two).
CUDNN_ATTENTION = "vision"
_NO_CUDNN = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def _attention_without_cudnn():
    return (contextlib.nullcontext() if CUDNN_ATTENTION == "all"
            else sdpa_kernel(list(_NO_CUDNN)))


def supports(model) -> bool:
    """True for BLIP-2 models whose language model is an OPT decoder this module can run."""
    lm = getattr(model, "language_model", None)
    cfg = getattr(lm, "config", None)
    return (getattr(cfg, "model_type", None) == "opt" and cfg.do_layer_norm_before
            and getattr(cfg, "activation_function", "relu") == "relu"
            and lm.model.decoder.project_in is None and lm.model.decoder.project_out is None)


@dataclass
class _Prefix:
    valid: torch.Tensor  # (B,) prompt tokens that are not padding
    logits: torch.Tensor  # (B, V) float32: next-token logits after the prompt


@dataclass(eq=False)
class _Workspace:
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
    encoder: "_EncodeGraph | None" = None


@dataclass(eq=False)
class _EncodeGraph:
    """Static inputs and outputs of a captured image encoding + prompt prefill."""
    pixels: torch.Tensor  # (images, 3, S, S) normalised
    ids: torch.Tensor  # (images, length) left-padded to the workspace's prompt length
    mask: torch.Tensor
    valid: torch.Tensor  # (images,) outputs, copied in by the graph
    logits: torch.Tensor  # (images, V) float32
    graph: object = None


class _Flag:
    """A boolean computed on the device, read back without draining the queue first: on CUDA
    it is copied to pinned memory behind an event, so the host can queue the next decoding
    step before it waits for the flag (the GPU never idles while the host decides)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.value = None
        if self.cuda:
            self.host = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self.event = torch.cuda.Event()

    def post(self, value: torch.Tensor) -> None:
        if self.cuda:
            self.host.copy_(value, non_blocking=True)
            self.event.record()
        else:
            self.value = value

    def read(self) -> bool:
        if self.cuda:
            self.event.synchronize()
            return bool(self.host)
        return bool(self.value)


class FastGenerator:
    def __init__(self, model, eos_token_id: int, pad_token_id: int, cuda_graphs: bool = False,
                 bucket: bool | None = None, graph_memory_bytes: int = 0,
                 overlap: bool = True, encode_graphs: bool = True, fuse_qkv: bool = True):
        if not supports(model):
            raise ValueError("FastGenerator needs a BLIP-2 model with an OPT decoder")
        self.model = model
        self.lm = model.language_model
        self.decoder = self.lm.model.decoder
        cfg = self.lm.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eos = eos_token_id
        self.pad = pad_token_id
        suppress = self.lm.generation_config.suppress_tokens or []
        self.suppress = torch.tensor(sorted(suppress), dtype=torch.long) if suppress else None
        self._suppress_on: dict[torch.device, torch.Tensor] = {}
        self.cuda_graphs = cuda_graphs
        # overlap: queue step t's decoder pass before reading whether the search stopped at t
        # (one wasted pass at the end instead of a host/GPU round trip at every step)
        self.overlap = overlap
        self.encode_graphs = encode_graphs
        self.encode_replays = 0
        self.encode_failures = 0
        self._qkv = [self._fused_qkv(layer.self_attn) if fuse_qkv else None
                     for layer in self.decoder.layers]
        # Bucketing (padding batches and prompts to fixed shapes) is what lets graphs be reused;
        # it can be switched on without graphs to test that padding changes nothing.
        self.bucket = cuda_graphs if bucket is None else bucket
        self.graph_memory_bytes = graph_memory_bytes
        self._cache: OrderedDict[tuple, _Workspace] = OrderedDict()
        self._pool = None
        self.graph_failures = 0
        self.graph_replays = 0

    def release(self) -> None:
        """Drop cached workspaces and graphs (after an out-of-memory error, for instance)."""
        self._cache.clear()
        self._pool = None

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
                            cache_enabled=False), _attention_without_cudnn():
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
                attention_mask: torch.Tensor, ws: _Workspace) -> _Prefix:
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
        with _attention_without_cudnn():
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
        return _Prefix(attention_mask.sum(1), self._logits(h[:, -1]))

    def _step_static(self, ws: _Workspace) -> None:
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

    def _attend(self, q: torch.Tensor, ws: _Workspace, i: int) -> torch.Tensor:
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

    # --- workspaces and graphs ------------------------------------------------------------
    def _shape_for(self, images: int, length: int) -> tuple[int, int]:
        """(image capacity, prompt length) of the workspace for a batch."""
        if not self.bucket:
            return images, length
        cap = next((c for c in GRAPH_BATCHES if c >= images), images)
        return cap, -(-length // GRAPH_PROMPT_MULTIPLE) * GRAPH_PROMPT_MULTIPLE

    def _workspace_bytes(self, images: int, per_image: int, length: int, steps: int,
                         like: torch.Tensor) -> int:
        per_token = 2 * len(self.decoder.layers) * self.heads * self.head_dim
        kv = per_token * (images * length + images * per_image * steps) * like.element_size()
        return kv + images * per_image * self.lm.lm_head.out_features * 4

    def _new_workspace(self, images: int, per_image: int, length: int, steps: int,
                       like: torch.Tensor) -> _Workspace:
        rows, layers = images * per_image, len(self.decoder.layers)
        dev, dt = like.device, like.dtype
        prefix = torch.zeros(2 * layers, images, self.heads, length, self.head_dim, device=dev,
                             dtype=dt)
        gen = torch.zeros(layers, 2, images, self.heads, per_image, steps, self.head_dim,
                          device=dev, dtype=dt)
        table = torch.full((steps, 1, 1, 1, steps), float("-inf"), device=dev, dtype=dt)
        for t in range(steps):
            table[t, ..., :t + 1] = 0
        return _Workspace(images, per_image, length, steps, prefix,
                          torch.zeros(images, 1, 1, length, device=dev, dtype=dt), gen,
                          table[0].clone(),
                          torch.full((rows,), self.pad, dtype=torch.long, device=dev),
                          torch.zeros(rows, dtype=torch.long, device=dev),
                          torch.zeros(1, dtype=torch.long, device=dev),
                          torch.zeros(rows, self.lm.lm_head.out_features, device=dev),
                          bytes=self._workspace_bytes(images, per_image, length, steps, like),
                          bias_table=table)

    def _workspace(self, images: int, per_image: int, length: int, steps: int,
                   like: torch.Tensor) -> _Workspace:
        cap, padded = self._shape_for(images, length)
        graphable = (self.cuda_graphs and like.is_cuda and self._workspace_bytes(
            cap, per_image, padded, steps, like) <= self.graph_memory_bytes)
        if not graphable:  # eager: exact shapes unless padding was asked for (tests)
            shape = (cap, padded) if self.bucket and not self.cuda_graphs else (images, length)
            return self._new_workspace(shape[0], per_image, shape[1], steps, like)
        key = (cap, per_image, padded, steps, like.dtype, like.device)
        ws = self._cache.pop(key, None)
        if ws is None:
            self._evict(self._workspace_bytes(cap, per_image, padded, steps, like))
            ws = self._new_workspace(cap, per_image, padded, steps, like)
        self._cache[key] = ws  # most recently used last
        return ws

    def _evict(self, incoming: int) -> None:
        """Drop least recently used workspaces until ``incoming`` more bytes fit the budget."""
        while self._cache and (sum(w.bytes for w in self._cache.values()) + incoming
                               > self.graph_memory_bytes):
            self._cache.popitem(last=False)

    def _run_step(self, ws: _Workspace, tokens: torch.Tensor, positions: torch.Tensor,
                  t: int) -> torch.Tensor:
        rows = tokens.shape[0]
        ws.tokens[:rows].copy_(tokens)
        ws.positions[:rows].copy_(positions)
        ws.t_index.fill_(t)
        ws.gen_bias.copy_(ws.bias_table[t])
        if self.cuda_graphs and ws.tokens.is_cuda and self._graph(ws):
            ws.graph.replay()
            self.graph_replays += 1
        else:
            self._step_static(ws)
        return ws.logits[:rows]

    def _graph(self, ws: _Workspace) -> bool:
        """Capture ``ws``'s step once (its inputs for this step are already in place, and the
        step only writes its outputs, so the warm-up runs are harmless). False if capture is
        impossible here: then the step runs eagerly."""
        if ws.graph is not None:
            return True
        if ws not in self._cache.values():
            return False
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step_static(ws)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step_static(ws)
            ws.graph = graph
            return True
        except torch.OutOfMemoryError:
            raise  # not a capture problem: the engine's fallback halves the batch
        except Exception:  # noqa: BLE001 - a capture failure must never fail a caption
            self.graph_failures += 1
            self.cuda_graphs = self.graph_failures < 3  # a device that cannot capture: stop
            torch.cuda.synchronize()
            return False

    def _encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, ws: _Workspace) -> _Prefix:
        """Image encoding + prompt prefill: replayed from a CUDA graph for small batches whose
        workspace is cached (inputs padded to the workspace's shape), else run eagerly."""
        enc = self._encode_graph(ws, pixel_values, input_ids, attention_mask)
        if enc is None:
            extra = ws.length - input_ids.shape[1]  # padded shapes: left-pad the prompt too
            if extra:
                input_ids = F.pad(input_ids, (extra, 0), value=self.pad)
                attention_mask = F.pad(attention_mask, (extra, 0), value=0)
            return self.prefill(pixel_values, input_ids, attention_mask, ws)
        self._fill_encode_inputs(enc, pixel_values, input_ids, attention_mask)
        enc.graph.replay()
        self.encode_replays += 1
        b = input_ids.shape[0]
        return _Prefix(enc.valid[:b], enc.logits[:b])

    def _fill_encode_inputs(self, enc: _EncodeGraph, pixel_values: torch.Tensor,
                            input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        b, length = input_ids.shape
        start = enc.ids.shape[1] - length  # left padding up to the workspace's prompt length
        enc.pixels[:b].copy_(pixel_values)
        enc.ids[:b, :start] = self.pad
        enc.ids[:b, start:].copy_(input_ids)
        enc.mask[:b, :start] = 0
        enc.mask[:b, start:].copy_(attention_mask)
        if b < enc.ids.shape[0]:  # padding images: copies of the first (finite, never read)
            enc.pixels[b:] = enc.pixels[:1]
            enc.ids[b:] = enc.ids[:1]
            enc.mask[b:] = enc.mask[:1]

    def _encode_graph(self, ws: _Workspace, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> _EncodeGraph | None:
        """``ws``'s captured encoder (captured on first use), or None where it does not apply
        or capture is impossible here."""
        if ws.encoder is not None:
            return ws.encoder
        if not (self.encode_graphs and self.cuda_graphs and pixel_values.is_cuda
                and ws.images <= ENCODE_GRAPH_MAX_IMAGES and input_ids.shape[1] <= ws.length
                and ws in self._cache.values()):
            return None
        cap, dev = ws.images, pixel_values.device
        enc = _EncodeGraph(
            pixels=torch.empty((cap, *pixel_values.shape[1:]), dtype=pixel_values.dtype,
                               device=dev),
            ids=torch.full((cap, ws.length), self.pad, dtype=torch.long, device=dev),
            mask=torch.zeros((cap, ws.length), dtype=torch.long, device=dev),
            valid=torch.zeros(cap, dtype=torch.long, device=dev),
            logits=torch.zeros(cap, self.lm.lm_head.out_features, device=dev))
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._fill_encode_inputs(enc, pixel_values, input_ids, attention_mask)
                for _ in range(2):  # warm-up: it writes only ws's prefix, rewritten per batch
                    self.prefill(enc.pixels, enc.ids, enc.mask, ws)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.prefill(enc.pixels, enc.ids, enc.mask, ws)
                enc.valid.copy_(out.valid)  # outputs live outside the graph's memory pool
                enc.logits.copy_(out.logits)
            enc.graph = graph
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - capture failure: encode eagerly from now on
            self.encode_graphs = False
            self.encode_failures += 1
            torch.cuda.synchronize()
            return None
        ws.encoder = enc
        ws.bytes += enc.pixels.numel() * enc.pixels.element_size()
        return enc

    # --- logits processing (transformers' semantics) ---------------------------------------
    def _process(self, scores: torch.Tensor, history: torch.Tensor, t: int,
                 params: GenerationParams) -> torch.Tensor:
        if params.repetition_penalty != 1.0:
            seen = scores.gather(1, history)
            seen = torch.where(seen < 0, seen * params.repetition_penalty,
                               seen / params.repetition_penalty)
            scores = scores.scatter(1, history, seen)
        if t < params.min_length:
            scores[:, self.eos] = float("-inf")
        if self.suppress is not None:
            ids = self._suppress_on.get(scores.device)
            if ids is None:
                ids = self._suppress_on[scores.device] = self.suppress.to(scores.device)
            scores[:, ids] = float("-inf")
        return scores

    @staticmethod
    def _top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        return scores.masked_fill(scores < kth, float("-inf"))

    @staticmethod
    def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
        if top_p >= 1.0:
            return scores
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[:, -1] = False  # always keep the most likely token
        return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))

    # --- search -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, params: GenerationParams) -> list[list[int]]:
        """New token ids per output row (image-major: ``num_captions`` rows per image)."""
        sampling = params.use_nucleus_sampling or params.effective_beams == 1
        per_image = (params.num_captions if params.use_nucleus_sampling else 1) if sampling \
            else params.num_beams
        ws = self._workspace(input_ids.shape[0], per_image, input_ids.shape[1],
                             params.max_length, self.decoder.embed_tokens.weight)
        prefix = self._encode(pixel_values, input_ids, attention_mask, ws)
        if sampling:
            return self._sample(ws, prefix, input_ids, params, per_image)
        return self._beam_search(ws, prefix, input_ids, params)

    def _sample(self, ws: _Workspace, prefix: _Prefix, input_ids: torch.Tensor,
                params: GenerationParams, k: int) -> list[list[int]]:
        rows = input_ids.shape[0] * k
        device = input_ids.device
        history = input_ids.repeat_interleave(k, 0)
        positions = prefix.valid.repeat_interleave(k, 0)
        logits = prefix.logits.repeat_interleave(k, 0)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        out = torch.full((rows, params.max_length), self.pad, dtype=torch.long, device=device)
        steps = 0
        stopped = _Flag(device)
        for t in range(params.max_length):
            scores = self._process(logits, history, t, params)
            if params.use_nucleus_sampling:
                if params.temperature != 1.0:  # a tiny temperature overflows: cap at the
                    big = torch.finfo(scores.dtype).max  # largest finite value (~greedy)
                    scores = torch.nan_to_num(scores / params.temperature, posinf=big)
                scores = self._top_k(scores, SAMPLING_TOP_K)
                probs = self._top_p(scores, params.top_p).softmax(-1)
                token = torch.multinomial(probs, 1)[:, 0]
            else:
                token = scores.argmax(-1)
            token = torch.where(done, torch.full_like(token, self.pad), token)
            out[:, t] = token
            history = torch.cat([history, token[:, None]], 1)
            done |= token == self.eos
            steps = t + 1
            if t + 1 == params.max_length:
                break
            stopped.post(done.all())
            if not self.overlap and stopped.read():
                break
            logits = self._run_step(ws, token, positions + t, t)
            if self.overlap and stopped.read():  # the pass just queued is not needed
                break
        return out[:, :steps].tolist()

    def _beam_search(self, ws: _Workspace, prefix: _Prefix, input_ids: torch.Tensor,
                     params: GenerationParams) -> list[list[int]]:
        k, lp, steps_max = params.num_beams, params.length_penalty, params.max_length
        b, prompt_len = input_ids.shape
        keep = 2 * k  # candidates per image: enough to continue k beams even if k end
        device = input_ids.device
        vocab = prefix.logits.shape[-1]
        seqs = input_ids.repeat_interleave(k, 0).view(b, k, prompt_len)
        run_scores = torch.zeros(b, k, device=device)
        run_scores[:, 1:] = NEG
        fin_seqs = torch.full((b, k, prompt_len + steps_max), self.pad, dtype=torch.long,
                              device=device)
        fin_scores = torch.full((b, k), NEG, device=device)
        fin_done = torch.zeros(b, k, dtype=torch.bool, device=device)
        improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
        first_k = torch.arange(keep, device=device) < k
        positions = prefix.valid.repeat_interleave(k, 0)
        logits = prefix.logits.repeat_interleave(k, 0)
        stopped = _Flag(device)
        for t in range(steps_max):
            history = seqs.view(b * k, -1)
            scores = self._process(logits.log_softmax(-1), history, t, params)
            total = (scores.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
            cand_scores, cand = torch.topk(total, keep)
            parent, token = cand // vocab, cand % vocab
            cand_seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, seqs.shape[2])),
                                   token[:, :, None]], 2)
            ends = (token == self.eos) | (t + 1 >= steps_max)
            # the k best candidates that did not end keep running
            live = torch.topk(cand_scores + ends.float() * NEG, k).indices
            seqs = cand_seqs.gather(1, live[:, :, None].expand(-1, -1, cand_seqs.shape[2]))
            run_scores = cand_scores.gather(1, live)
            # among the first k candidates, those that ended may become finished hypotheses
            normed = cand_scores / float((t + 1) ** lp)
            normed = normed + (~improvable).float() * NEG + (~(ends & first_k)).float() * NEG
            padded = F.pad(cand_seqs, (0, fin_seqs.shape[2] - cand_seqs.shape[2]),
                           value=self.pad)
            all_seqs = torch.cat([fin_seqs, padded], 1)
            all_scores = torch.cat([fin_scores, normed], 1)
            all_done = torch.cat([fin_done, ends & first_k], 1)
            best = torch.topk(all_scores, k).indices
            fin_seqs = all_seqs.gather(1, best[:, :, None].expand(-1, -1, all_seqs.shape[2]))
            fin_scores = all_scores.gather(1, best)
            fin_done = all_done.gather(1, best)
            # could a running beam still beat the worst finished one? (transformers' heuristic)
            best_running = run_scores[:, :1] / float((t + 1) ** lp)
            worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values,
                                torch.full_like(fin_scores, NEG))
            improvable = improvable & (best_running > worst).any(-1, keepdim=True)
            if t + 1 == steps_max:
                break
            stopped.post(~improvable.any() | ends.all())
            if not self.overlap and stopped.read():
                break
            if t:  # follow the surviving beams' histories (real images), all layers at once
                hist = ws.gen[:, :, :b, :, :, :t]
                parents = parent.gather(1, live).view(1, 1, b, 1, k, 1, 1).expand(hist.shape)
                hist.copy_(hist.gather(4, parents))
            logits = self._run_step(ws, seqs[:, :, -1].reshape(-1), positions + t, t)
            if self.overlap and stopped.read():  # the pass just queued is not needed
                break
        best = fin_seqs[:, :params.num_captions, prompt_len:].reshape(b * params.num_captions, -1)
        return best.tolist()
