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
  shape and replayed (``cuda_graphs``): a small batch's step costs one launch instead of one
  per kernel.

The search itself is the one transformers runs, so results are the same tokens: greedy
(argmax), beam search (top 2k candidates per image over accumulated log-probs, the first k
that end are finalised with score / generated_len ** length_penalty, transformers' default
early-stopping heuristic, best ``num_captions`` returned), and nucleus sampling (temperature,
then top-k 50 (transformers' default), then top-p, multinomial). Logits processing matches
transformers' order and semantics: repetition penalty over the row's real tokens (the prompt
included, its left padding not), ``min_new_tokens`` bans eos, ``suppress_tokens`` from the
model's generation config. Tests compare the tokens with ``model.generate`` over many parameter
mixes and mixed prompt lengths, on a checkpoint that suppresses nothing.

Supported: OPT decoders with ``do_layer_norm_before`` (every BLIP-2 OPT checkpoint), whose
language model's generation config sets nothing the search does not implement. Anything else
runs on transformers' generate (``refusal(model)`` says why).

The package, split as vLLM splits a decoder (model, runner, sampler):

- ``opt``: ``OptModel``, the OPT decoder's math (prompt embeddings, prefill, one decoding step,
  the attention over the shared prefix, the fused q/k/v projection, the logits);
- ``graphs``: ``GraphRunner(OptModel)``, the workspaces' cache and the CUDA graphs that replay
  a step or an image encoding + prefill, with one capture helper for both;
- ``search``: logits processing, sampling and beam search, as functions over a step callable;
- ``generator``: ``FastGenerator(GraphRunner)``, whose ``generate`` runs the search over its
  steps;
- ``workspace``: the fixed-shape buffers a step reads and writes (leaf);
- ``options``: ``DecodeOptions``, the decoder's switches (leaf).

Each class adds one concern to the one below it and calls only down; the search knows neither.
"""
from .generator import FastGenerator, refusal
from .opt import supports
from .options import DecodeOptions

__all__ = ["DecodeOptions", "FastGenerator", "refusal", "supports"]
