"""Workspaces and CUDA graphs: the buffers of each batch shape, kept in a cache within a memory
budget, and the graphs that replay a decoding step (``_graph``) or an image encoding + prompt
prefill (``_encode_graph``) on them."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F

from .opt import OptModel
from .options import DecodeOptions
from .workspace import EncodeGraph, Prefix, Workspace

# Image counts a graph is captured for (a batch is padded up to the next one); batches whose
# step buffers exceed the graph memory budget run eagerly at their exact size.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
GRAPH_PROMPT_MULTIPLE = 8  # prompt lengths are left-padded to a multiple of this for graphs
# Image encoding + prompt prefill is graphed too for batches up to this many images: there the
# GPU work is small and launching its kernels one by one is what costs the time.
ENCODE_GRAPH_MAX_IMAGES = 16


def padded_shape(images: int, length: int) -> tuple[int, int]:
    """The graph shape a batch is padded to: (image capacity, prompt length)."""
    cap = next((c for c in GRAPH_BATCHES if c >= images), images)
    return cap, -(-length // GRAPH_PROMPT_MULTIPLE) * GRAPH_PROMPT_MULTIPLE


def workspace_shape(images: int, length: int, *, graphs: bool, pad_eager: bool,
                    fits: Callable[[int, int], bool]) -> tuple[int, int, bool]:
    """(image capacity, prompt length, graphable) of the workspace for a batch.

    Padding only pays where a graph replays the padded shape: while graphs are on and the
    padded shape ``fits`` the graph budget. Once graphs are off (after capture failures, or a
    self-check that switched them off), or past the budget, a batch runs eagerly at its exact
    shape: padding it would only add work, in buffers ``batch_limit`` did not plan for.
    ``pad_eager`` pads eager batches all the same (tests, and the self-check's reference)."""
    if graphs:
        cap, padded = padded_shape(images, length)
        if fits(cap, padded):
            return cap, padded, True
    elif pad_eager:
        return (*padded_shape(images, length), False)
    return images, length, False


def within_budget(incoming: int, cached: int, pool: int, budget: int) -> bool:
    """Whether ``incoming`` more workspace bytes fit the graph budget beside the workspaces
    already cached and the graphs' memory pool."""
    return incoming + cached + pool <= budget


class GraphRunner(OptModel):
    """Runs the model's prefill and steps on cached workspaces, from CUDA graphs where they
    apply (``_encode``, ``_run_step``), eagerly elsewhere."""

    def __init__(self, model, pad_token_id: int, options: DecodeOptions):
        super().__init__(model, options)
        self.pad = pad_token_id
        # both switch off after capture failures (see _graph, _encode_graph)
        self.cuda_graphs = options.cuda_graphs
        self.encode_graphs = options.encode_graphs
        self.encode_replays = 0
        self.encode_failures = 0
        self.pad_eager = options.bucket
        self.graph_memory_bytes = options.graph_memory_bytes
        self._cache: OrderedDict[tuple, Workspace] = OrderedDict()
        self._pool = None
        # device memory the graphs' private pool holds (it grows at captures and is given back
        # only with the pool, at release()): counted in the graph budget and by the engine's
        # batch_limit, since no eager batch can use it
        self.pool_bytes = 0
        self.graph_failures = 0
        self.graph_replays = 0

    def release(self) -> None:
        """Drop cached workspaces and graphs (after an out-of-memory error, for instance)."""
        self._cache.clear()
        self._pool = None
        self.pool_bytes = 0

    def graphs_off(self) -> None:
        """Decode eagerly from now on, at exact shapes (the self-check's fallback)."""
        self.cuda_graphs = False
        self.encode_graphs = False
        self.release()

    # --- workspaces and graphs ------------------------------------------------------------
    def _workspace_bytes(self, images: int, per_image: int, length: int, steps: int,
                         like: torch.Tensor) -> int:
        per_token = 2 * len(self.decoder.layers) * self.heads * self.head_dim
        kv = per_token * (images * length + images * per_image * steps) * like.element_size()
        return kv + images * per_image * self.lm.lm_head.out_features * 4

    def _new_workspace(self, images: int, per_image: int, length: int, steps: int,
                       like: torch.Tensor) -> Workspace:
        rows, layers = images * per_image, len(self.decoder.layers)
        dev, dt = like.device, like.dtype
        prefix = torch.zeros(2 * layers, images, self.heads, length, self.head_dim, device=dev,
                             dtype=dt)
        gen = torch.zeros(layers, 2, images, self.heads, per_image, steps, self.head_dim,
                          device=dev, dtype=dt)
        table = torch.full((steps, 1, 1, 1, steps), float("-inf"), device=dev, dtype=dt)
        for t in range(steps):
            table[t, ..., :t + 1] = 0
        return Workspace(images, per_image, length, steps, prefix,
                          torch.zeros(images, 1, 1, length, device=dev, dtype=dt), gen,
                          table[0].clone(),
                          torch.full((rows,), self.pad, dtype=torch.long, device=dev),
                          torch.zeros(rows, dtype=torch.long, device=dev),
                          torch.zeros(1, dtype=torch.long, device=dev),
                          torch.zeros(rows, self.lm.lm_head.out_features, device=dev),
                          bytes=self._workspace_bytes(images, per_image, length, steps, like),
                          bias_table=table)

    def _workspace(self, images: int, per_image: int, length: int, steps: int,
                   like: torch.Tensor) -> Workspace:
        def fits(cap: int, padded: int) -> bool:
            return within_budget(self._workspace_bytes(cap, per_image, padded, steps, like),
                                 0, self.pool_bytes, self.graph_memory_bytes)
        cap, padded, graphable = workspace_shape(
            images, length, graphs=self.cuda_graphs and like.is_cuda, pad_eager=self.pad_eager,
            fits=fits)
        if not graphable:
            return self._new_workspace(cap, per_image, padded, steps, like)
        key = (cap, per_image, padded, steps, like.dtype, like.device)
        ws = self._cache.pop(key, None)
        if ws is None:
            self._evict(self._workspace_bytes(cap, per_image, padded, steps, like))
            ws = self._new_workspace(cap, per_image, padded, steps, like)
        self._cache[key] = ws  # most recently used last
        return ws

    def _evict(self, incoming: int) -> None:
        """Drop least recently used workspaces until ``incoming`` more bytes fit the budget
        beside the graph pool."""
        while self._cache and not within_budget(
                incoming, sum(w.bytes for w in self._cache.values()), self.pool_bytes,
                self.graph_memory_bytes):
            self._cache.popitem(last=False)

    def _run_step(self, ws: Workspace, tokens: torch.Tensor, positions: torch.Tensor,
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

    def _graph(self, ws: Workspace) -> bool:
        """Capture ``ws``'s step once (its inputs for this step are already in place, and the
        step only writes its outputs, so the warm-up runs are harmless). False if capture is
        impossible here: then the step runs eagerly."""
        if ws.graph is not None:
            return True
        if ws not in self._cache.values():
            return False

        def warm_up() -> None:
            for _ in range(2):
                self._step_static(ws)

        def failed() -> None:
            self.graph_failures += 1
            self.cuda_graphs = self.graph_failures < 3  # a device that cannot capture: stop
        ws.graph = self._capture(warm_up, lambda: self._step_static(ws), failed)
        return ws.graph is not None

    def _capture(self, warm_up: Callable[[], None], record: Callable[[], None],
                 failed: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        """A CUDA graph of ``record()``, captured in the generator's one memory pool after
        ``warm_up()`` has run on a side stream; None where capture fails (``failed()`` has
        counted it), and the caller runs eagerly. Both graphs, the step's and the encoder's,
        are captured here."""
        try:
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    warm_up()
            finally:  # even after an error: what warm_up queued must finish before its
                current.wait_stream(side)  # buffers can be freed and reused
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the decode threads pin host memory for every image meanwhile, which
            # torch's default "global" mode forbids to every thread during a capture (their
            # allocation fails, and so does the capture)
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                # read inside: entering empties torch's cache, which lowers what is reserved
                before = torch.cuda.memory_reserved()
                record()
            self.pool_bytes += max(0, torch.cuda.memory_reserved() - before)  # the pool's growth
            return graph
        except torch.OutOfMemoryError:
            raise  # not a capture problem: the engine's fallback halves the batch
        except Exception:  # noqa: BLE001 - a capture failure must never fail a caption
            failed()
            torch.cuda.synchronize()
            return None

    def _encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, ws: Workspace) -> Prefix:
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
        return Prefix(enc.valid[:b], enc.logits[:b])

    def _fill_encode_inputs(self, enc: EncodeGraph, pixel_values: torch.Tensor,
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

    def _encode_graph(self, ws: Workspace, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> EncodeGraph | None:
        """``ws``'s captured encoder (captured on first use), or None where it does not apply
        or capture is impossible here."""
        if ws.encoder is not None:
            return ws.encoder
        if not (self.encode_graphs and self.cuda_graphs and pixel_values.is_cuda
                and ws.images <= ENCODE_GRAPH_MAX_IMAGES and input_ids.shape[1] <= ws.length
                and ws in self._cache.values()):
            return None
        cap, dev = ws.images, pixel_values.device
        enc = EncodeGraph(
            pixels=torch.empty((cap, *pixel_values.shape[1:]), dtype=pixel_values.dtype,
                               device=dev),
            ids=torch.full((cap, ws.length), self.pad, dtype=torch.long, device=dev),
            mask=torch.zeros((cap, ws.length), dtype=torch.long, device=dev),
            valid=torch.zeros(cap, dtype=torch.long, device=dev),
            logits=torch.zeros(cap, self.lm.lm_head.out_features, device=dev))

        def warm_up() -> None:
            self._fill_encode_inputs(enc, pixel_values, input_ids, attention_mask)
            for _ in range(2):  # warm-up: it writes only ws's prefix, rewritten per batch
                self.prefill(enc.pixels, enc.ids, enc.mask, ws)

        def record() -> None:
            out = self.prefill(enc.pixels, enc.ids, enc.mask, ws)
            enc.valid.copy_(out.valid)  # outputs live outside the graph's memory pool
            enc.logits.copy_(out.logits)

        def failed() -> None:  # encode eagerly from now on
            self.encode_graphs = False
            self.encode_failures += 1
        enc.graph = self._capture(warm_up, record, failed)
        if enc.graph is None:
            return None
        ws.encoder = enc
        ws.bytes += enc.pixels.numel() * enc.pixels.element_size()
        return enc
