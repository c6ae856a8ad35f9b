"""The search the fast decoder runs, with transformers' semantics: logits processing, greedy
and nucleus sampling, beam search, as functions over a step callable.

``step(tokens, positions, t) -> logits`` feeds one token per row at step ``t`` (``positions``:
each row's position in its sequence) and returns the next-token logits, (rows, V) float32. Beam
search also takes ``reorder(parents, t)``, which makes each row's generated keys and values
those of the beam it continues (``parents``: (images, beams)). Rows are image-major: the
``k`` rows of an image are adjacent. ``prompt``: (images, L) left-padded prompt ids as
``prompt_history`` makes them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from params import GenerationParams

from .workspace import Prefix

NEG = -1.0e9  # transformers' "impossible" score
SAMPLING_TOP_K = 50  # transformers' default top_k, which LAVIS's sampling inherits too

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Reorder = Callable[[torch.Tensor, int], None]


@dataclass(frozen=True, eq=False)
class SpecialTokens:
    eos: int
    pad: int
    suppress: torch.Tensor | None = None  # never generated; on the logits' device


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


def step_unless_stopped(stopped: _Flag, stop: torch.Tensor, overlap: bool,
                        advance: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The next step's logits (``advance()``), or None where the search stopped (``stop``, a
    device boolean). With ``overlap`` the next step's pass is queued before the flag is read:
    one wasted pass at the end instead of a host/GPU round trip at every step."""
    stopped.post(stop)
    if not overlap and stopped.read():
        return None
    logits = advance()
    if overlap and stopped.read():  # the pass just queued is not needed
        return None
    return logits


# --- the model's generation config -------------------------------------------------------
# What the fast decoder does with each field of the language model's generation config that
# transformers' generate would read. Every field set there (not None, and not one of the
# harmless values listed) that is in none of these sets sends the model to transformers'
# generate (``unsupported_settings``), so nothing set there is silently ignored. A field the
# search learns to honour moves to HONOURED.
HONOURED = frozenset({"suppress_tokens"})
# the request sets these in both decoders (eos is "\n", pad is the tokenizer's)
FROM_THE_REQUEST = frozenset({
    "max_new_tokens", "max_length", "num_beams", "num_return_sequences", "do_sample",
    "repetition_penalty", "length_penalty", "top_p", "top_k", "temperature", "eos_token_id",
    "pad_token_id"})
# fields that do not change which tokens come out (and every field whose name starts with _)
NO_EFFECT = frozenset({
    "transformers_version", "bos_token_id", "decoder_start_token_id",
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
    "disable_compile", "low_memory", "prefill_chunk_size", "continuous_batching_config",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "is_assistant", "assistant_confidence_threshold",
    "assistant_early_exit", "assistant_lookbehind", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "prompt_lookup_num_tokens", "max_matching_ngram_size",
    "target_lookbehind", "assistant_ensemble_weight"})
# values of other fields that are transformers' own behaviour when the field is unset
HARMLESS = {"early_stopping": (False,), "no_repeat_ngram_size": (0,),
            "encoder_no_repeat_ngram_size": (0,), "encoder_repetition_penalty": (1.0,),
            "min_length": (0,), "min_new_tokens": (0,), "num_beam_groups": (1,),
            "diversity_penalty": (0.0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,),
            "eta_cutoff": (0.0,), "renormalize_logits": (False,),
            "remove_invalid_values": (False,), "guidance_scale": (1.0,),
            "bad_words_ids": ([],), "begin_suppress_tokens": ([],)}


def unsupported_settings(generation_config) -> list[str]:
    """``name=value`` for each field of ``generation_config`` (a transformers
    ``GenerationConfig``) that changes the tokens and that the fast decoder does not honour."""
    out = []
    for name, value in sorted(vars(generation_config).items()):
        if (value is None or name.startswith("_") or name in HONOURED
                or name in FROM_THE_REQUEST or name in NO_EFFECT
                or value in HARMLESS.get(name, ())):
            continue
        out.append(f"{name}={value!r}"[:80])
    return out


# --- logits processing (transformers' semantics) -------------------------------------------
def prompt_history(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The prompt as the repetition penalty sees it: each row's left padding replaced by the
    row's last token, which is real (rows are left-padded) and already in the row, so the
    padding adds nothing to the set of tokens seen. transformers skips the same positions
    (``prompt_ignore_length``); counting them would give ``<pad>`` a penalty in a batch whose
    prompts differ in length and none alone, and the caption would depend on its batch."""
    return torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])


def process(scores: torch.Tensor, history: torch.Tensor, t: int, params: GenerationParams,
            special: SpecialTokens) -> torch.Tensor:
    """Repetition penalty over the row's real tokens (prompt included; ``history`` starts
    with ``prompt_history``), ``min_length`` bans eos, and the suppressed tokens."""
    if params.repetition_penalty != 1.0:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty,
                           seen / params.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if t < params.min_length:
        scores[:, special.eos] = float("-inf")
    if special.suppress is not None:
        scores[:, special.suppress] = float("-inf")
    return scores


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[:, -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return scores
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop = cumulative <= (1 - p)
    drop[:, -1] = False  # always keep the most likely token
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def warp(scores: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Nucleus sampling's scores: temperature, then top-k, then top-p."""
    if params.temperature != 1.0:  # a tiny temperature overflows: cap at the
        big = torch.finfo(scores.dtype).max  # largest finite value (~greedy)
        scores = torch.nan_to_num(scores / params.temperature, posinf=big)
    scores = top_k(scores, SAMPLING_TOP_K)
    return top_p(scores, params.top_p)


# --- search -------------------------------------------------------------------------------
def sample(step: Step, prefix: Prefix, prompt: torch.Tensor, params: GenerationParams,
           k: int, special: SpecialTokens, overlap: bool) -> list[list[int]]:
    """Greedy (argmax) or nucleus sampling, ``k`` rows per image: new token ids per row."""
    rows = prompt.shape[0] * k
    device = prompt.device
    history = prompt.repeat_interleave(k, 0)
    positions = prefix.valid.repeat_interleave(k, 0)
    logits = prefix.logits.repeat_interleave(k, 0)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out = torch.full((rows, params.max_length), special.pad, dtype=torch.long, device=device)
    steps = 0
    stopped = _Flag(device)
    for t in range(params.max_length):
        scores = process(logits, history, t, params, special)
        if params.use_nucleus_sampling:
            probs = warp(scores, params).softmax(-1)
            token = torch.multinomial(probs, 1)[:, 0]
        else:
            token = scores.argmax(-1)
        token = torch.where(done, torch.full_like(token, special.pad), token)
        out[:, t] = token
        history = torch.cat([history, token[:, None]], 1)
        done |= token == special.eos
        steps = t + 1
        if t + 1 == params.max_length:
            break
        logits = step_unless_stopped(stopped, done.all(), overlap,
                                     lambda: step(token, positions + t, t))
        if logits is None:
            break
    return out[:, :steps].tolist()


def beam_search(step: Step, reorder: Reorder, prefix: Prefix, prompt: torch.Tensor,
                params: GenerationParams, special: SpecialTokens,
                overlap: bool) -> list[list[int]]:
    """Beam search: the best ``num_captions`` of ``num_beams`` hypotheses per image, new token
    ids per row."""
    k, lp, steps_max = params.num_beams, params.length_penalty, params.max_length
    b, prompt_len = prompt.shape
    keep = 2 * k  # candidates per image: enough to continue k beams even if k end
    device = prompt.device
    vocab = prefix.logits.shape[-1]
    seqs = prompt.repeat_interleave(k, 0).view(b, k, prompt_len)
    run_scores = torch.zeros(b, k, device=device)
    run_scores[:, 1:] = NEG
    fin_seqs = torch.full((b, k, prompt_len + steps_max), special.pad, dtype=torch.long,
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
        scores = process(logits.log_softmax(-1), history, t, params, special)
        total = (scores.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
        cand_scores, cand = torch.topk(total, keep)
        parent, token = cand // vocab, cand % vocab
        cand_seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, seqs.shape[2])),
                               token[:, :, None]], 2)
        ends = (token == special.eos) | (t + 1 >= steps_max)
        # the k best candidates that did not end keep running
        live = torch.topk(cand_scores + ends.float() * NEG, k).indices
        seqs = cand_seqs.gather(1, live[:, :, None].expand(-1, -1, cand_seqs.shape[2]))
        run_scores = cand_scores.gather(1, live)
        # among the first k candidates, those that ended may become finished hypotheses
        normed = cand_scores / float((t + 1) ** lp)
        normed = normed + (~improvable).float() * NEG + (~(ends & first_k)).float() * NEG
        padded = F.pad(cand_seqs, (0, fin_seqs.shape[2] - cand_seqs.shape[2]),
                       value=special.pad)
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

        def advance() -> torch.Tensor:
            if t:  # the surviving beams continue their parents' histories
                reorder(parent.gather(1, live), t)
            return step(seqs[:, :, -1].reshape(-1), positions + t, t)
        logits = step_unless_stopped(stopped, ~improvable.any() | ends.all(), overlap, advance)
        if logits is None:
            break
    best = fin_seqs[:, :params.num_captions, prompt_len:].reshape(b * params.num_captions, -1)
    return best.tolist()
