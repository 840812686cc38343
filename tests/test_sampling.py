"""Tests for the batched sampler: each filter and penalty against a slow/hand-computed twin,
seeded draws independent of the batch, the empirical distribution, logprobs and validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from k2model.sampling import adjust_logits, filter_logits, noise_seed, sample
from k2model.sampling_params import SamplingParams, SamplingRow

GREEDY = SamplingParams(temperature=0.0)


def _rows(params: SamplingParams, n: int, step: int = 0) -> list[SamplingRow]:
    return [SamplingRow(params, seed=1000 + i, step=step) for i in range(n)]


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# --- seed mixing ---------------------------------------------------------------------------


def test_noise_seed_is_splitmix64_stream() -> None:
    # Published SplitMix64 outputs for seed 1234567 (Vigna's reference C implementation).
    expected = [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    assert [noise_seed(1234567, step) for step in range(5)] == expected


# --- greedy --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits(7, 300, seed=1).to(dtype)
    result = sample(logits, _rows(GREEDY, 7))
    assert result.token_ids.dtype == torch.int64
    assert torch.equal(result.token_ids, logits.float().argmax(dim=-1))
    assert result.logprobs is None and result.top_ids.shape == (7, 0)


def test_temperature_to_zero_approaches_greedy() -> None:
    logits = _logits(16, 200, seed=2)
    cold = SamplingParams(temperature=1e-4)
    for step in range(3):
        result = sample(logits, _rows(cold, 16, step))
        assert torch.equal(result.token_ids, logits.argmax(dim=-1))


def test_top_k_one_is_greedy() -> None:
    logits = _logits(16, 200, seed=3)
    hot = SamplingParams(temperature=2.0, top_k=1)
    for step in range(3):
        assert torch.equal(sample(logits, _rows(hot, 16, step)).token_ids, logits.argmax(-1))


def test_greedy_rows_in_mixed_batch_use_adjusted_logits() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 3)
    banned = SamplingParams(temperature=0.0, logit_bias={1: -100.0})
    rows = [
        SamplingRow(GREEDY, 0, 0),
        SamplingRow(banned, 0, 0),
        SamplingRow(SamplingParams(top_k=1), 0, 0),
    ]
    assert sample(logits, rows).token_ids.tolist() == [1, 3, 1]


# --- filters against slow per-row references -----------------------------------------------


def _reference_support(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Plain-python top-k (ties kept) -> minimal top-p nucleus -> min-p, in float64."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    if 0 < top_k < len(row):
        kth = row[order[top_k - 1]]
        order = [i for i in order if row[i] >= kth]
    z = max(row[i] for i in order)
    weights = {i: math.exp(row[i] - z) for i in order}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for i in order:
        if top_p < 1.0 and mass >= top_p:
            break
        kept.append(i)
        mass += weights[i] / total
    p_max = max(weights[i] for i in kept)
    return {i for i in kept if weights[i] >= min_p * p_max}


def _support(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(0, 0.5, 0.0), (0, 0.9, 0.0), (0, 0.99, 0.0), (5, 1.0, 0.0), (40, 1.0, 0.0),
     (0, 1.0, 0.1), (0, 1.0, 0.5), (20, 0.8, 0.05), (3, 0.3, 0.0)],
)  # fmt: skip
def test_filters_match_slow_reference(top_k: int, top_p: float, min_p: float) -> None:
    logits = _logits(12, 64, seed=top_k + int(100 * top_p), scale=2.0)
    params = [SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)] * 12
    filtered = filter_logits(logits, params)
    for b in range(12):
        reference = _reference_support(logits[b].double().tolist(), top_k, top_p, min_p)
        assert _support(filtered[b]) == reference
        kept = sorted(reference)
        assert torch.equal(filtered[b, kept], logits[b, kept])  # kept logits are untouched


def test_top_p_nucleus_is_minimal() -> None:
    # probs [0.5, 0.3, 0.15, 0.05]: top_p 0.8 needs exactly two tokens, 0.81 needs three.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _support(filter_logits(logits, [SamplingParams(top_p=0.79)])[0]) == {0, 1}
    assert _support(filter_logits(logits, [SamplingParams(top_p=0.81)])[0]) == {0, 1, 2}
    assert _support(filter_logits(logits, [SamplingParams(top_p=0.4)])[0]) == {0}
    # Exact boundary (four probs of exactly 0.25): mass 0.5 is reached by two tokens, and ties
    # are ranked by token id.
    uniform = torch.zeros(1, 4)
    assert _support(filter_logits(uniform, [SamplingParams(top_p=0.5)])[0]) == {0, 1}


def test_filters_are_per_row() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3).log()
    params = [SamplingParams(top_p=0.6), SamplingParams(), SamplingParams(min_p=0.4)]
    filtered = filter_logits(logits, params)
    assert [_support(r) for r in filtered] == [{0, 1}, {0, 1, 2, 3}, {0, 1}]


def test_sampled_tokens_stay_in_filtered_support() -> None:
    logits = _logits(1, 50, seed=5, scale=1.0).expand(400, 50)
    params = SamplingParams(temperature=1.3, top_k=10, top_p=0.7, min_p=0.2)
    reference = _reference_support((logits[0] / 1.3).double().tolist(), 10, 0.7, 0.2)
    drawn = set(sample(logits, _rows(params, 400)).token_ids.tolist())
    assert drawn == reference  # never outside, and 400 draws reach every kept token


# --- penalties and bias, hand-computed -----------------------------------------------------

PENALTY_LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])


def _adjust(params: SamplingParams) -> list[float]:
    row = SamplingRow(params, seed=0, step=0, prompt_ids=[0, 1], output_ids=[3, 3, 2])
    return adjust_logits(PENALTY_LOGITS, [row])[0].tolist()


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output() -> None:
    assert _adjust(SamplingParams(repetition_penalty=2.0)) == [1.0, -2.0, 0.25, 1.5, 0.0]


def test_presence_penalty_counts_output_tokens_once() -> None:
    assert _adjust(SamplingParams(presence_penalty=0.5)) == [2.0, -1.0, 0.0, 2.5, 0.0]


def test_frequency_penalty_scales_with_output_count() -> None:
    assert _adjust(SamplingParams(frequency_penalty=0.5)) == [2.0, -1.0, 0.0, 2.0, 0.0]


def test_negative_penalties_encourage() -> None:
    assert _adjust(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.25)) == [
        2.0, -1.0, 1.75, 4.5, 0.0,
    ]  # fmt: skip


def test_bias_then_penalties_compose_in_order() -> None:
    params = SamplingParams(
        logit_bias={4: 2.0, 1: 3.0}, repetition_penalty=2.0, frequency_penalty=1.0
    )
    # bias: [2, 2, .5, 3, 2]; repetition over {0,1,2,3}: [1, 1, .25, 1.5, 2]; freq: -[0,0,1,2,0]
    assert _adjust(params) == [1.0, 1.0, -0.75, -0.5, 2.0]


def test_penalties_apply_only_to_their_row() -> None:
    logits = PENALTY_LOGITS.expand(2, 5)
    rows = [
        SamplingRow(SamplingParams(frequency_penalty=2.0), 0, 0, [0], [3]),
        SamplingRow(SamplingParams(), 0, 0, [0], [3]),
    ]
    adjusted = adjust_logits(logits, rows)
    assert adjusted[0].tolist() == [2.0, -1.0, 0.5, 1.0, 0.0]
    assert torch.equal(adjusted[1], logits[1])
    greedy = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert sample(logits[:1], [SamplingRow(greedy, 0, 0, [0], [3])]).token_ids.tolist() == [0]


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = _logits(1, 100, seed=6).expand(32, 100)
    forced = SamplingParams(temperature=1.0, logit_bias={17: 100.0})
    assert set(sample(logits, _rows(forced, 32)).token_ids.tolist()) == {17}
    top = int(logits[0].argmax())
    banned = SamplingParams(temperature=0.0, logit_bias={top: -100.0})
    assert int(sample(logits[:1], [SamplingRow(banned, 0, 0)]).token_ids[0]) != top
    banned_sampled = SamplingParams(temperature=1.0, top_k=2, logit_bias={top: -100.0})
    assert top not in sample(logits, _rows(banned_sampled, 32)).token_ids.tolist()


def test_logit_bias_is_stored_hashable_and_checked_against_vocab() -> None:
    params = SamplingParams(logit_bias={9: 1.5, 2: -3.0})
    assert params.logit_bias == ((2, -3.0), (9, 1.5))
    assert hash(params) == hash(SamplingParams(logit_bias={2: -3.0, 9: 1.5}))
    with pytest.raises(ValueError, match="vocab"):
        sample(torch.zeros(1, 5), [SamplingRow(params, 0, 0)])


# --- per-request randomness ----------------------------------------------------------------

FLAT = SamplingParams(temperature=1.0)


def test_seeded_draw_is_independent_of_batch_position_and_composition() -> None:
    vocab = 64
    target = _logits(1, vocab, seed=7, scale=0.3)  # near-uniform: draws really are random
    others = _logits(4, vocab, seed=8)
    for seed in range(10):
        alone = sample(target, [SamplingRow(FLAT, seed, 5)]).token_ids[0]
        batch = torch.cat([others[:3], target, others[3:]])
        rows = [
            SamplingRow(SamplingParams(temperature=0.7), seed + 1, 5),
            SamplingRow(GREEDY, 0, 0),
            SamplingRow(SamplingParams(top_p=0.5, frequency_penalty=1.0), 99, 2, [1], [2, 3]),
            SamplingRow(FLAT, seed, 5),
            SamplingRow(FLAT, seed, 6),
        ]
        assert sample(batch, rows).token_ids[3] == alone
        low = target.to(torch.bfloat16)
        in_bf16 = sample(low, [SamplingRow(FLAT, seed, 5)]).token_ids[0]
        assert in_bf16 == sample(low.float(), [SamplingRow(FLAT, seed, 5)]).token_ids[0]


def test_steps_and_seeds_give_different_draws() -> None:
    logits = torch.zeros(1, 1000)  # uniform: repeated tokens would mean repeated noise
    by_step = [
        int(sample(logits, [SamplingRow(FLAT, 42, step)]).token_ids[0]) for step in range(20)
    ]
    by_seed = [int(sample(logits, [SamplingRow(FLAT, seed, 0)]).token_ids[0]) for seed in range(20)]
    assert len(set(by_step)) >= 15
    assert len(set(by_seed)) >= 15
    assert by_step != by_seed


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_tempered_softmax() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 0.8, -1.5, 0.0])
    params = SamplingParams(temperature=0.7)
    n = 6000
    tokens = sample(logits.expand(n, 6), _rows(params, n, step=3)).token_ids
    counts = torch.bincount(tokens, minlength=6).double()
    # df = 5: P(chi2 > 25) ~ 1.4e-4; the seeds are fixed, so the test is deterministic.
    assert _chi_square(counts, (logits / 0.7).softmax(-1).double()) < 25.0
    assert _chi_square(counts, logits.softmax(-1).double()) > 100.0  # the bound can fail


def test_empirical_distribution_renormalises_over_the_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    n = 4000
    tokens = sample(logits.expand(n, 4), _rows(SamplingParams(top_p=0.75), n)).token_ids
    counts = torch.bincount(tokens, minlength=4).double()
    assert counts[2:].sum() == 0
    assert _chi_square(counts[:2], torch.tensor([0.625, 0.375], dtype=torch.float64)) < 15.0


# --- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_at_the_chosen_token() -> None:
    logits = _logits(4, 80, seed=9).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=True),
        SamplingParams(temperature=0.5, frequency_penalty=1.0, logprobs=True),
        SamplingParams(temperature=1.0, logit_bias={3: 100.0}, logprobs=True),
        SamplingParams(temperature=1.0),
    ]
    rows = [SamplingRow(p, i, 0, [1, 2], [3]) for i, p in enumerate(params)]
    result = sample(logits, rows)
    raw = logits.float().log_softmax(-1)
    assert result.logprobs is not None and result.logprobs.dtype == torch.float32
    expected = raw.gather(1, result.token_ids.unsqueeze(1)).squeeze(1)
    assert torch.allclose(result.logprobs, expected)
    assert result.token_ids[2] == 3 and result.row(2).logprob == pytest.approx(float(raw[2, 3]))
    assert (result.row(3).logprob, result.row(3).top) == (None, ())


def test_top_logprobs_sorted_correct_and_prefixed_per_row() -> None:
    logits = _logits(3, 50, seed=10)
    params = [
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=0.0, logprobs=True),
    ]
    result = sample(logits, [SamplingRow(p, 0, 0) for p in params])
    assert result.top_ids.shape == (3, 5) and result.top_logprobs.shape == (3, 5)
    for b, n in enumerate([5, 2, 0]):
        raw = logits[b].double().log_softmax(-1).tolist()
        best = sorted(range(50), key=lambda i: -raw[i])[:n]
        row = result.row(b)
        token, logprob, top = row.token_id, row.logprob, list(row.top)
        assert token == int(logits[b].argmax())
        assert [i for i, _ in top] == best
        assert [lp for _, lp in top] == pytest.approx([raw[i] for i in best], abs=1e-5)
        assert all(a >= c for (_, a), (_, c) in itertools.pairwise(top))
        assert logprob == pytest.approx(raw[token], abs=1e-5)
    assert result.cpu().row(0) == result.row(0)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
        ("top_k", -1),
        ("min_p", -0.01), ("min_p", 1.0),
        ("presence_penalty", -2.01), ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0), ("frequency_penalty", 2.01),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("top_logprobs", -1), ("top_logprobs", 21),
    ],
)  # fmt: skip
def test_out_of_range_fields_are_rejected(field: str, value: float) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value, **extra})


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: -101.0}, {-1: 1.0}, {1: math.nan}])
def test_out_of_range_logit_bias_is_rejected(bias: dict[int, float]) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_top_logprobs_requires_logprobs_and_edges_are_accepted() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=3)
    edge = SamplingParams(
        temperature=0.0, top_p=1.0, min_p=0.0, presence_penalty=-2.0, frequency_penalty=2.0,
        logit_bias={0: -100.0, 1: 100.0}, logprobs=True, top_logprobs=20,
    )  # fmt: skip
    assert edge.is_greedy and edge.adjusts_logits
    assert not SamplingParams().is_greedy and not SamplingParams().adjusts_logits


def test_logits_shape_must_match_rows() -> None:
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, 5), [SamplingRow(GREEDY, 0, 0)])


def test_a_seed_is_resolved_once_and_kept() -> None:
    own = SamplingParams(temperature=1.0, seed=5)
    assert own.seeded() == (own, 5)
    drawn, seed = SamplingParams(temperature=1.0).seeded()
    assert drawn.seed == seed and 0 <= seed < 2**63
    assert drawn.seeded() == (drawn, seed)  # resolving again keeps it
