"""The fast decoder's search (src/generation/search.py) on synthetic logits: nucleus sampling's
warping against transformers' own logits warpers, and the length bounds counted exactly on a
step whose preferences are known. (tests/test_fastgen.py compares whole searches with
transformers' generate on the tiny model; there, a vocabulary whose sampling never has more than
50 candidates cannot show whether top-k is applied.)"""
import pytest
import torch
from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from generation import search
from generation.workspace import Prefix
from params import GenerationParams as G

VOCAB = 300


def synthetic_scores() -> torch.Tensor:
    """Rows of logits over VOCAB tokens: flat (the top-p nucleus spans far more than 50 tokens,
    so only top-k cuts it), moderate, peaked, with ties at the 50th value, and with banned
    (-inf) tokens."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, VOCAB, generator=gen)
    ties = torch.arange(VOCAB, dtype=torch.float32).div(7).floor()  # 7 tokens per value
    banned = noise[3].clone()
    banned[::3] = float("-inf")
    return torch.stack([noise[0] * 0.05, noise[1], noise[2] * 6.0, ties, banned])


def transformers_warp(scores: torch.Tensor, params) -> torch.Tensor:
    """What transformers' generate applies for do_sample with top_k=50 (its default, and the
    worker's explicit setting on the hf decoder): temperature, then top-k, then top-p (each
    only when it changes something), in this order."""
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    warpers.append(TopKLogitsWarper(50))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers(torch.zeros(scores.shape[0], 1, dtype=torch.long), scores.clone())


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.9, 0.5, 1e-6])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_warp_keeps_exactly_the_tokens_transformers_keeps(top_p, temperature):
    scores = synthetic_scores()
    params = G(use_nucleus_sampling=True, top_p=top_p, temperature=temperature)
    want = transformers_warp(scores, params)
    got = search.warp(scores.clone(), params)
    assert torch.equal(got.isneginf(), want.isneginf())
    assert torch.equal(got, want)


def test_top_k_cuts_a_flat_distribution_to_fifty_tokens_with_their_ties():
    scores = synthetic_scores()
    kept = search.warp(scores.clone(), G(use_nucleus_sampling=True, top_p=1.0)).isfinite()
    assert kept[0].sum() == 50  # of 300 tokens with nearly the same score
    assert kept[3].sum() == 55  # the 50th best value is shared by 7 tokens: all are kept
    assert kept[4].sum() <= 50


@pytest.mark.parametrize("k", [1, 7, 50, VOCAB, VOCAB + 5])
def test_top_k_alone_matches_transformers(k):
    scores = synthetic_scores()
    want = TopKLogitsWarper(k)(None, scores.clone())
    assert torch.equal(search.top_k(scores.clone(), k), want)


@pytest.mark.parametrize("p", [0.3, 0.8, 0.99, 1.0])
def test_top_p_alone_matches_transformers(p):
    scores = synthetic_scores()
    want = scores if p >= 1.0 else TopPLogitsWarper(p)(None, scores.clone())
    assert torch.equal(search.top_p(scores.clone(), p), want)


def test_a_tiny_temperature_samples_the_best_token_instead_of_overflowing():
    # scores / 1e-38 overflows float32: the best token's becomes the largest finite value
    scores = torch.full((3, VOCAB), -1.0)
    best = torch.tensor([4, 120, 299])
    scores[torch.arange(3), best] = 2.0
    warped = search.warp(scores, G(use_nucleus_sampling=True, temperature=1e-38, top_p=0.9))
    assert not warped.isnan().any()
    assert torch.equal(warped.argmax(-1), best)
    probs = warped.softmax(-1)
    assert not probs.isnan().any()
    assert torch.equal(torch.multinomial(probs, 1)[:, 0], best)


# --- the length bounds, on a step whose preferences are known -----------------------------

EOS, PAD, LIKED = 2, 1, 5
SMALL_VOCAB = 8


def eager_step(eos_logit: float):
    """A step whose logits are the same at every position: the token LIKED scores 4, eos
    ``eos_logit`` (above 4: it wants to stop at once; far below: it never wants to), the
    rest 0."""
    logits = torch.zeros(SMALL_VOCAB)
    logits[LIKED], logits[EOS] = 4.0, eos_logit

    def step(tokens, positions, t):
        return logits.expand(tokens.shape[0], -1).clone()
    return step, logits


def run_search(params, eos_logit: float, images: int = 2) -> list[list[int]]:
    """The search (greedy, sampling or beams, as ``params`` say) over ``eager_step`` for
    ``images`` prompts of 3 tokens: the new token ids of each output row."""
    step, logits = eager_step(eos_logit)
    input_ids = torch.tensor([[6, 7, 3]] * images)
    prefix = Prefix(valid=torch.full((images,), 3), logits=logits.expand(images, -1).clone())
    special = search.SpecialTokens(eos=EOS, pad=PAD)
    if params.use_nucleus_sampling or params.num_beams == 1:
        k = params.num_captions if params.use_nucleus_sampling else 1
        return search.sample(step, prefix, input_ids, params, k, special, overlap=False)
    return search.beam_search(step, lambda parents, t: None, prefix, input_ids, params,
                              special, overlap=False)


def new_tokens(row: list[int]) -> list[int]:
    """A row's caption tokens: up to eos, which only padding may follow."""
    if EOS not in row:
        return row
    end = row.index(EOS)
    assert set(row[end + 1:]) <= {PAD}, row
    return row[:end]


def check_rows(params, rows, best: list[int]) -> None:
    """Each image's first row is ``best``; its other captions (beam search's alternatives) keep
    the length bounds too."""
    k = params.num_captions
    assert len(rows) == 2 * k
    assert [new_tokens(r) for r in rows[::k]] == [best, best]
    for r in rows:
        assert params.min_length <= len(new_tokens(r)) <= params.max_length, r


SEARCHES = {"greedy": dict(num_beams=1), "beams3": dict(num_beams=3),
            "beams3x2": dict(num_beams=3, num_captions=2),
            "sampling": dict(use_nucleus_sampling=True, top_p=0.9, num_captions=2)}


@pytest.mark.parametrize("search_kind", SEARCHES)
@pytest.mark.parametrize("min_length", [0, 1, 5])
def test_a_caption_that_wants_to_end_ends_at_exactly_min_length(search_kind, min_length):
    params = G(max_length=9, min_length=min_length, **SEARCHES[search_kind])
    rows = run_search(params, eos_logit=9.0)
    check_rows(params, rows, [LIKED] * min_length)
    assert all(r[min_length] == EOS for r in rows[::params.num_captions])


@pytest.mark.parametrize("search_kind", SEARCHES)
@pytest.mark.parametrize("max_length", [1, 4, 9])
def test_a_caption_that_never_wants_to_end_has_exactly_max_length_tokens(search_kind,
                                                                       max_length):
    params = G(max_length=max_length, min_length=0, **SEARCHES[search_kind])
    rows = run_search(params, eos_logit=-50.0)
    check_rows(params, rows, [LIKED] * max_length)
    assert all(len(r) == max_length and EOS not in r for r in rows)


@pytest.mark.parametrize("search_kind", SEARCHES)
def test_min_length_equal_to_max_length_forces_every_token(search_kind):
    params = G(max_length=6, min_length=6, **SEARCHES[search_kind])
    rows = run_search(params, eos_logit=9.0)
    check_rows(params, rows, [LIKED] * 6)
    assert all(len(r) == 6 and EOS not in r for r in rows)
