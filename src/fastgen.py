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
- per step, one fused Python loop over the decoder layers, no cache objects, no mask building.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from params import GenerationParams

NEG = -1.0e9  # transformers' "impossible" score
SAMPLING_TOP_K = 50  # transformers' default top_k, which LAVIS's sampling inherits too


def supports(model) -> bool:
    """True for BLIP-2 models whose language model is an OPT decoder this module can run."""
    lm = getattr(model, "language_model", None)
    cfg = getattr(lm, "config", None)
    return (getattr(cfg, "model_type", None) == "opt" and cfg.do_layer_norm_before
            and getattr(cfg, "activation_function", "relu") == "relu"
            and lm.model.decoder.project_in is None and lm.model.decoder.project_out is None)


@dataclass
class _Prefix:
    keys: list[torch.Tensor]  # per layer (B, H, L, d): the prompt's cache, once per image
    values: list[torch.Tensor]
    bias: torch.Tensor  # (B, 1, 1, L): 0 where the prompt has a token, -inf on left padding
    valid: torch.Tensor  # (B,) prompt tokens that are not padding
    logits: torch.Tensor  # (B, V) float32: next-token logits after the prompt


class FastGenerator:
    def __init__(self, model, eos_token_id: int, pad_token_id: int):
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
        self.vocab = cfg.vocab_size
        suppress = self.lm.generation_config.suppress_tokens or []
        self.suppress = torch.tensor(sorted(suppress), dtype=torch.long) if suppress else None

    # --- the model, step by step ----------------------------------------------------------
    def _prompt_embeds(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        image = m.vision_model(pixel_values, return_dict=True).last_hidden_state
        queries = m.query_tokens.expand(image.shape[0], -1, -1)
        q = m.qformer(query_embeds=queries, encoder_hidden_states=image,
                      encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long,
                                                        device=image.device),
                      return_dict=True).last_hidden_state
        projected = m.language_projection(q.to(image.dtype))
        embeds = self.decoder.embed_tokens(input_ids)
        slots = (input_ids == m.config.image_token_index).unsqueeze(-1)
        return embeds.masked_scatter(slots, projected.to(embeds.dtype))

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
                attention_mask: torch.Tensor) -> _Prefix:
        embeds = self._prompt_embeds(pixel_values, input_ids)
        b, length = input_ids.shape
        mask = attention_mask.bool()
        positions = (attention_mask.cumsum(1) * attention_mask - 1).long()
        h = embeds + self.decoder.embed_positions(attention_mask, 0, position_ids=positions)
        # causal & not padding; every row may see itself so no softmax row is empty
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        allowed = causal[None] & mask[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=h.device)[None]
        attn_mask = allowed[:, None]  # (B, 1, L, L)
        keys, values = [], []
        for layer in self.decoder.layers:
            a = layer.self_attn
            x = layer.self_attn_layer_norm(h)
            q = self._split(a.q_proj(x) * a.scaling)
            k, v = self._split(a.k_proj(x)), self._split(a.v_proj(x))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
            h = h + a.out_proj(o.transpose(1, 2).reshape(b, length, -1))
            h = self._mlp(layer, h)
            keys.append(k)
            values.append(v)
        bias = torch.zeros(b, 1, 1, length, dtype=h.dtype, device=h.device)
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
        return _Prefix(keys, values, bias, attention_mask.sum(1),
                       self._logits(h[:, -1]))

    def _step(self, prefix: _Prefix, gen_k: list[torch.Tensor], gen_v: list[torch.Tensor],
              tokens: torch.Tensor, positions: torch.Tensor, t: int, per_image: int
              ) -> torch.Tensor:
        """Feed one token per row (rows = images x per_image); return (rows, V) logits."""
        rows = tokens.shape[0]
        b = rows // per_image
        h = self.decoder.embed_tokens(tokens)[:, None]
        h = h + self.decoder.embed_positions(None, 0, position_ids=positions[:, None])
        for i, layer in enumerate(self.decoder.layers):
            a = layer.self_attn
            x = layer.self_attn_layer_norm(h)
            q = self._split(a.q_proj(x) * a.scaling)  # (R, H, 1, d)
            gen_k[i][:, :, t] = self._split(a.k_proj(x))[:, :, 0]
            gen_v[i][:, :, t] = self._split(a.v_proj(x))[:, :, 0]
            o = self._attend(q, prefix.keys[i], prefix.values[i], prefix.bias,
                             gen_k[i][:, :, :t + 1], gen_v[i][:, :, :t + 1], b, per_image)
            h = h + a.out_proj(o)
            h = self._mlp(layer, h)
        return self._logits(h[:, 0])

    def _attend(self, q, pk, pv, bias, gk, gv, b: int, k: int) -> torch.Tensor:
        """Attention of one new token per row over its image's shared prompt cache and its own
        generated tokens, with one softmax over both."""
        heads, d = self.heads, self.head_dim
        qi = q.view(b, k, heads, d).transpose(1, 2)  # (B, H, k, d)
        s_prefix = qi @ pk.transpose(-1, -2) + bias  # (B, H, k, L)
        s_gen = (q @ gk.transpose(-1, -2)).view(b, k, heads, -1).transpose(1, 2)  # (B,H,k,t)
        p = torch.cat([s_prefix, s_gen], dim=-1).float().softmax(-1).to(q.dtype)
        length = pk.shape[2]
        out = p[..., :length] @ pv  # (B, H, k, d)
        p_gen = p[..., length:].transpose(1, 2).reshape(b * k, heads, 1, -1)
        out = out.transpose(1, 2).reshape(b * k, heads, 1, d) + p_gen @ gv
        return out.transpose(1, 2).reshape(b * k, 1, heads * d)

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
            scores[:, self.suppress.to(scores.device)] = float("-inf")
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
        prefix = self.prefill(pixel_values, input_ids, attention_mask)
        if params.use_nucleus_sampling or params.effective_beams == 1:
            return self._sample(prefix, input_ids, params)
        return self._beam_search(prefix, input_ids, params)

    def _buffers(self, rows: int, steps: int, like: torch.Tensor):
        shape = (rows, self.heads, steps, self.head_dim)
        n = len(self.decoder.layers)
        return ([like.new_empty(shape) for _ in range(n)],
                [like.new_empty(shape) for _ in range(n)])

    def _sample(self, prefix: _Prefix, input_ids: torch.Tensor,
                params: GenerationParams) -> list[list[int]]:
        k = params.num_captions if params.use_nucleus_sampling else 1
        b = input_ids.shape[0]
        rows = b * k
        device = input_ids.device
        gen_k, gen_v = self._buffers(rows, params.max_length, prefix.keys[0])
        history = input_ids.repeat_interleave(k, 0)
        positions = prefix.valid.repeat_interleave(k, 0)
        logits = prefix.logits.repeat_interleave(k, 0)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        out = torch.full((rows, params.max_length), self.pad, dtype=torch.long, device=device)
        steps = 0
        for t in range(params.max_length):
            scores = self._process(logits, history, t, params)
            if params.use_nucleus_sampling:
                if params.temperature != 1.0:
                    scores = scores / params.temperature
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
            if bool(done.all()) or t + 1 == params.max_length:
                break
            logits = self._step(prefix, gen_k, gen_v, token, positions + t, t, k)
        return out[:, :steps].tolist()

    def _beam_search(self, prefix: _Prefix, input_ids: torch.Tensor,
                     params: GenerationParams) -> list[list[int]]:
        k, lp, steps_max = params.num_beams, params.length_penalty, params.max_length
        b, prompt_len = input_ids.shape
        keep = 2 * k  # candidates per image: enough to continue k beams even if k end
        device = input_ids.device
        vocab = prefix.logits.shape[-1]
        gen_k, gen_v = self._buffers(b * k, steps_max, prefix.keys[0])
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
        image_offset = (torch.arange(b, device=device) * k)[:, None]
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
            rows = (parent.gather(1, live) + image_offset).view(-1)
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
            if not bool(improvable.any()) or bool(ends.all()):
                break
            for i in range(len(gen_k)):  # follow the surviving beams' histories
                gen_k[i][:, :, :t] = gen_k[i][rows, :, :t]
                gen_v[i][:, :, :t] = gen_v[i][rows, :, :t]
            logits = self._step(prefix, gen_k, gen_v, seqs[:, :, -1].reshape(-1),
                                positions + t, t, k)
        best = fin_seqs[:, :params.num_captions, prompt_len:].reshape(b * params.num_captions, -1)
        return best.tolist()
