"""Sampler tests: exact paths against argmax, HF and OpenAI formulas; sampled ones by support, statistics."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepflow.engine.sampler import (
    GREEDY_EPS,
    RequestSamplingState,
    Sampler,
    SamplerOutput,
    TokenLogprobs,
    make_state,
)
from deepflow.engine.sampling_params import SamplingParams

EOS = 2


def state(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset({EOS}),
    **kw: object,
) -> RequestSamplingState:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    params.validate()
    s = make_state(params, prompt if prompt is not None else [5, 6, 7], eos)
    s.output_token_ids.extend(output or [])
    return s


def seeded_sampler(seed: int = 0) -> Sampler:
    return Sampler(generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# -- reference implementation (float64, per row, straightforward) ---------------------------------------


def ref_processed(logits: torch.Tensor, s: RequestSamplingState) -> torch.Tensor:
    """min_tokens masking + repetition (HF) + frequency/presence (OpenAI) penalties, one row."""
    x = logits.double().clone()
    p = s.params
    if len(s.output_token_ids) < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(s.eos_token_ids))
        for t in banned:
            if t < len(x):
                x[t] = -math.inf
    for t in set(s.prompt_token_ids) | set(s.output_token_ids):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t, c in Counter(s.output_token_ids).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def ref_distribution(processed: torch.Tensor, p: SamplingParams, slack: float = 0.0) -> torch.Tensor:
    """Sampling distribution after temperature/top_k/top_p/min_p; `slack` widens top_p/min_p boundaries."""
    y = processed.double() / p.temperature
    order = torch.argsort(y, descending=True)
    keep = torch.isfinite(y)
    if 0 < p.top_k < len(y):
        keep[order[p.top_k :]] = False
    probs = torch.where(keep, y, -math.inf).softmax(-1)
    if p.top_p < 1.0:
        sorted_probs = probs[order]
        exclusive = sorted_probs.cumsum(0) - sorted_probs
        keep[order[exclusive >= p.top_p + slack]] = False
        probs = torch.where(keep, y, -math.inf).softmax(-1)
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs.max() * (1 - slack)
    return torch.where(keep, y, -math.inf).softmax(-1)


# -- greedy and the fast path ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = randn(16, 500).to(dtype)
    out = Sampler()(logits, [state(temperature=0.0) for _ in range(16)])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_fast_path_taken_and_agrees_with_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = randn(8, 300, seed=1)
    greedy = [state(temperature=0.0, seed=i) for i in range(8)]
    general = [state(temperature=0.0, logprobs=0) for _ in range(8)]  # logprobs forces the general path
    expected = Sampler()(logits, general).token_ids
    assert expected == logits.argmax(-1).tolist()

    def boom(*args: object) -> None:
        raise AssertionError("general path taken")

    monkeypatch.setattr(Sampler, "_general", boom)
    assert Sampler()(logits, greedy).token_ids == expected
    # Finished min_tokens is no reason to leave the fast path; penalties, logprobs, pending min_tokens are.
    assert Sampler()(logits[:1], [state(temperature=0.0, min_tokens=1, output=[9])]).token_ids == expected[:1]
    for kw in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.1}, {"logprobs": 1}, {"min_tokens": 1}):
        with pytest.raises(AssertionError, match="general path"):
            Sampler()(logits[:1], [state(temperature=0.0, **kw)])
    with pytest.raises(AssertionError, match="general path"):
        Sampler()(logits[:1], [state(temperature=1.0)])


def test_greedy_rows_draw_no_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    s = state(temperature=GREEDY_EPS / 2, seed=3)
    before = s.generator.get_state().clone()
    out = Sampler(generator=gen)(randn(1, 100), [s])
    assert out.token_ids == randn(1, 100).argmax(-1).tolist()
    assert torch.equal(s.generator.get_state(), before)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())


def test_empty_batch_and_shape_check() -> None:
    assert Sampler()(torch.empty(0, 10), []) == SamplerOutput(token_ids=[], logprobs=[])
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.zeros(2, 10), [state()])


# -- temperature, top_k, top_p, min_p -----------------------------------------------------------------


def well_separated(rows: int, vocab: int, gap: float = 0.01) -> torch.Tensor:
    """Distinct logits at least `gap` apart, so tiny temperatures make the argmax overwhelmingly likely."""
    g = torch.Generator().manual_seed(7)
    return torch.stack([torch.randperm(vocab, generator=g).float() * gap for _ in range(rows)])


def test_temperature_to_zero_limit_is_greedy() -> None:
    logits = well_separated(64, 400)
    states = [state(temperature=1e-4, seed=i if i % 2 else None) for i in range(64)]
    assert seeded_sampler()(logits, states).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = randn(64, 2000, seed=3, scale=0.3)  # flat: plain sampling would rarely hit the argmax
    greedy = logits.argmax(-1).tolist()
    sampler = seeded_sampler()
    assert sampler(logits, [state(temperature=1.5, top_k=1) for _ in range(64)]).token_ids == greedy
    assert sampler(logits, [state(temperature=1.5, top_p=1e-6) for _ in range(64)]).token_ids == greedy
    mixed = [
        state(temperature=2.0, top_p=1e-6, seed=i) if i % 2 else state(temperature=2.0, top_k=1)
        for i in range(64)
    ]
    assert sampler(logits, mixed).token_ids == greedy
    assert sampler(logits, [state(temperature=1.0) for _ in range(64)]).token_ids != greedy


def test_top_k_and_top_p_restrict_support() -> None:
    vocab, rows = 1000, 2000
    logits = randn(vocab, seed=4, scale=2.0)
    batch = logits.expand(rows, vocab)
    sampler = seeded_sampler(1)

    topk = set(logits.topk(10).indices.tolist())
    drawn = Counter(sampler(batch, [state(top_k=10) for _ in range(rows)]).token_ids)
    assert set(drawn) <= topk
    assert len(drawn) >= 8  # not collapsed to a few tokens

    params = SamplingParams(top_p=0.5)
    nucleus = set(torch.nonzero(ref_distribution(logits, params)).flatten().tolist())
    assert 1 < len(nucleus) < 100
    drawn = Counter(sampler(batch, [state(top_p=0.5) for _ in range(rows)]).token_ids)
    assert set(drawn) <= nucleus

    params = SamplingParams(top_k=30, top_p=0.6, temperature=0.8)
    support = set(torch.nonzero(ref_distribution(logits, params)).flatten().tolist())
    states = [state(top_k=30, top_p=0.6, temperature=0.8) for _ in range(rows)]
    drawn = Counter(sampler(batch, states).token_ids)
    assert set(drawn) <= support


def test_min_p_filters() -> None:
    logits = torch.tensor([4.0, 3.5, 3.0, 1.0, 0.0, -1.0]).log_softmax(-1)  # probs decreasing
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert allowed == {0, 1, 2}
    batch = logits.expand(5000, 6)
    assert set(seeded_sampler()(batch, [state(min_p=0.3) for _ in range(5000)]).token_ids) == allowed
    assert set(seeded_sampler()(batch, [state(min_p=1.0) for _ in range(5000)]).token_ids) == {0}


def test_top_p_nucleus_beyond_first_candidates() -> None:
    """Near-uniform logits: the 0.9 nucleus holds far more than the first candidates (retry path)."""
    vocab, rows = 6000, 64
    logits = randn(vocab, seed=5, scale=0.1)
    dist = ref_distribution(logits, SamplingParams(top_p=0.9))
    support = set(torch.nonzero(dist).flatten().tolist())
    assert len(support) > 4000
    states = [state(top_p=0.9, seed=i if i % 3 == 0 else None) for i in range(rows)]
    states += [state(top_k=2000, seed=1), state(temperature=0.0)]
    tokens = seeded_sampler()(logits.expand(rows + 2, vocab), states).token_ids
    assert set(tokens[:rows]) <= support
    ranks = torch.argsort(logits, descending=True).argsort()
    assert max(ranks[t].item() for t in tokens[:rows]) > 1024  # really sampled past the first candidates
    assert tokens[-1] == logits.argmax().item()


STAT_PARAMS = [
    {"temperature": 0.8},
    {"temperature": 1.3, "top_k": 4},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 0.7, "min_p": 0.2},
    {"temperature": 1.0, "top_k": 6, "top_p": 0.9, "min_p": 0.05},
]


@pytest.mark.parametrize("kw", STAT_PARAMS)
def test_sampling_frequencies_match_distribution(kw: dict[str, float]) -> None:
    vocab, rows = 10, 20_000
    logits = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.5, 0.7, 0.2, -2.0])
    expected = ref_distribution(logits, SamplingParams(**kw))
    tokens = seeded_sampler(11)(logits.expand(rows, vocab), [state(**kw) for _ in range(rows)]).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / rows
    assert observed[expected == 0].sum() == 0  # never outside the support
    assert (observed - expected).abs().max() < 0.012  # ~3.5 sigma at p = 0.5
    support = expected > 0
    chi2 = (rows * (observed - expected)[support] ** 2 / expected[support]).sum().item()
    assert chi2 < 30.0  # df <= 9: p < 5e-4


def test_seeded_rows_are_distributed_correctly() -> None:
    """Per-request generators (one per row here) also sample the right distribution."""
    vocab, rows = 10, 4000
    logits = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.5, 0.7, 0.2, -2.0])
    for kw in ({"temperature": 0.9}, {"temperature": 1.0, "top_p": 0.85}):
        expected = ref_distribution(logits, SamplingParams(**kw))
        states = [state(seed=1000 + i, **kw) for i in range(rows)]
        tokens = Sampler()(logits.expand(rows, vocab), states).token_ids
        observed = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / rows
        assert (observed - expected).abs().max() < 0.03


# -- penalties and min_tokens -------------------------------------------------------------------------


def processed_by_sampler(logits: torch.Tensor, s: RequestSamplingState) -> torch.Tensor:
    x = logits[None].float().clone()
    Sampler._mask_min_tokens(x, [s])
    Sampler._apply_penalties(x, [s])
    return x[0]


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_hf(penalty: float) -> None:
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    vocab = 200
    logits = randn(vocab, seed=8, scale=3.0)
    prompt, output = [1, 5, 5, 9, 40, 199], [9, 17, 17, 0, 150]
    hf = logits_process.RepetitionPenaltyLogitsProcessor(penalty=penalty)(
        torch.tensor([prompt + output]), logits[None].clone()
    )[0]
    s = state(prompt=prompt, output=output, repetition_penalty=penalty, temperature=0.0)
    torch.testing.assert_close(processed_by_sampler(logits, s), hf, rtol=0, atol=0)
    assert Sampler()(logits[None], [s]).token_ids == [hf.argmax().item()]


def test_frequency_presence_penalties_match_openai_formula() -> None:
    vocab = 100
    logits = randn(vocab, seed=9, scale=2.0)
    prompt, output = [3, 3, 4], [4, 7, 7, 7, 8, 3]  # prompt tokens do not count
    s = state(prompt=prompt, output=output, frequency_penalty=0.6, presence_penalty=-0.4, temperature=0.0)
    expected = logits.double().clone()
    for t, c in Counter(output).items():
        expected[t] -= 0.6 * c + (-0.4) * (c > 0)
    torch.testing.assert_close(processed_by_sampler(logits, s).double(), expected, rtol=0, atol=1e-5)
    # All penalties together, in order: repetition first, then frequency/presence.
    s = state(
        prompt=prompt, output=output, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5
    )
    ours = processed_by_sampler(logits, s).double()
    torch.testing.assert_close(ours, ref_processed(logits, s), atol=1e-5, rtol=0)


def test_penalties_ignore_out_of_range_ids() -> None:
    logits = randn(2, 50, seed=12)
    s = state(prompt=[3, 50, 10_000], output=[4, 77], repetition_penalty=2.0, frequency_penalty=1.0)
    x = logits.clone()
    Sampler._apply_penalties(x, [s, state()])
    torch.testing.assert_close(x[1], logits[1], rtol=0, atol=0)  # the next row is untouched
    changed = set(torch.nonzero(x[0] != logits[0]).flatten().tolist())
    assert changed == {3, 4}


def test_penalty_makes_greedy_avoid_repeats_and_history_tracks_outputs() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, -1.0]])
    s = state(prompt=[0], frequency_penalty=1.0, temperature=0.0)
    sampler = Sampler()
    seq = []
    for _ in range(6):
        token = sampler(logits, [s]).token_ids[0]
        s.output_token_ids.append(token)
        seq.append(token)
    assert seq == [1, 2, 3, 1, 2, 3]
    s.output_token_ids.clear()  # the runner may reset outputs (e.g. recompute): history follows
    assert sampler(logits, [s]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    vocab = 20
    logits = torch.zeros(vocab)
    logits[EOS], logits[11], logits[12], logits[5] = 10.0, 9.0, 8.0, 1.0
    sampler = seeded_sampler()

    def run(**kw: object) -> list[int]:
        s = state(eos=frozenset({EOS, 11}), stop_token_ids=[12, 999], min_tokens=3, **kw)
        for _ in range(4):
            s.output_token_ids.append(sampler(logits[None], [s]).token_ids[0])
        return s.output_token_ids

    assert run(temperature=0.0) == [5, 5, 5, EOS]
    assert run(temperature=0.0, ignore_eos=True) == [EOS, EOS, EOS, EOS]  # stop ids still masked, EOS not
    sampled = run(temperature=1.0, seed=4)
    assert not set(sampled[:3]) & {EOS, 11, 12}
    s = state(eos=frozenset({EOS, 11}), stop_token_ids=[12], min_tokens=3, ignore_eos=True, temperature=0.0)
    logits[EOS] = -5.0
    assert sampler(logits[None], [s]).token_ids == [11]  # 11 is EOS too: unmasked under ignore_eos


# -- seeded reproducibility ---------------------------------------------------------------------------


def fake_model(request: int, history: list[int], vocab: int) -> torch.Tensor:
    """Deterministic next-token logits for a request given its own history only."""
    return randn(vocab, seed=hash((request, *history)) % 2**62, scale=2.0)


def test_seeded_request_reproducible_alone_and_in_mixed_batches() -> None:
    vocab, steps = 3000, 8
    targets = {
        0: {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "repetition_penalty": 1.1},
        1: {"temperature": 1.0, "seed": 42, "frequency_penalty": 0.3},
        2: {"temperature": 0.7, "top_k": 50, "min_p": 0.02, "seed": 7, "logprobs": 2},
        3: {"temperature": 1.2, "top_p": 0.8, "top_k": 200, "seed": 99, "min_tokens": 3},
    }
    others = {
        10: {"temperature": 1.0},
        11: {"temperature": 0.0},
        12: {"temperature": 0.8, "top_k": 2500, "seed": 5},  # changes the candidate count for the batch
        13: {"temperature": 1.1, "top_p": 0.5, "logprobs": 3},
        14: {"temperature": 0.5, "seed": 1234},  # same seed as request 0, separate generator
    }

    def simulate(requests: dict[int, dict[str, object]], shuffle_seed: int | None) -> dict[int, list[int]]:
        states = {r: state(prompt=[r, 17, 17], **kw) for r, kw in requests.items()}
        sampler = Sampler(generator=torch.Generator().manual_seed(shuffle_seed or 0))
        rng = random.Random(shuffle_seed)
        for _ in range(steps):
            order = list(states)
            if shuffle_seed is not None:
                rng.shuffle(order)
            logits = torch.stack([fake_model(r, states[r].output_token_ids, vocab) for r in order])
            out = sampler(logits, [states[r] for r in order])
            for r, token in zip(order, out.token_ids, strict=True):
                states[r].output_token_ids.append(token)
        return {r: s.output_token_ids for r, s in states.items()}

    alone = {r: simulate({r: kw}, None)[r] for r, kw in targets.items()}
    assert all(len(set(seq)) > 3 for seq in alone.values())  # really sampled
    for shuffle_seed in (1, 2):
        mixed = simulate({**targets, **others}, shuffle_seed)
        assert {r: mixed[r] for r in targets} == alone
    subset = simulate({0: targets[0], 11: others[11], 2: targets[2]}, 3)
    assert subset[0] == alone[0] and subset[2] == alone[2]


def test_same_seed_and_logits_give_same_token_in_any_dtype() -> None:
    logits = randn(1, 1000, seed=2).expand(4, -1)
    a = Sampler()(logits, [state(seed=5, top_p=0.9) for _ in range(4)]).token_ids
    b = Sampler()(logits.double(), [state(seed=5, top_p=0.9) for _ in range(4)]).token_ids
    assert a == b and len(set(a)) == 1  # same seed, same logits: same token on every row


# -- logprobs -----------------------------------------------------------------------------------------


def test_logprobs_from_raw_logits() -> None:
    vocab = 500
    logits = randn(5, vocab, seed=6, scale=2.0)
    states = [
        state(temperature=0.0, logprobs=5),
        state(temperature=1.0, logprobs=0, seed=1),
        state(temperature=0.5, top_k=20, logprobs=20, repetition_penalty=1.5, output=[3, 4]),
        state(temperature=1.0),
        state(temperature=0.0, logprobs=3, frequency_penalty=2.0, output=[int(logits[4].argmax())]),
    ]
    out = seeded_sampler()(logits.to(torch.bfloat16), states)
    raw = logits.to(torch.bfloat16).float().log_softmax(-1)
    assert out.logprobs[3] is None
    for b, lp in enumerate(out.logprobs):
        if lp is None:
            continue
        assert isinstance(lp, TokenLogprobs)
        n = states[b].params.logprobs
        token = out.token_ids[b]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[b, token].item(), abs=1e-5)
        assert lp.rank == 1 + int((raw[b] > raw[b, token]).sum())
        assert len(lp.top_ids) == len(lp.top_logprobs) == n
        # bf16 logits tie a lot: check values, and that the ids carry them, rather than the tie order.
        assert lp.top_logprobs == pytest.approx(raw[b].topk(n).values.tolist(), abs=1e-5)
        assert len(set(lp.top_ids)) == n
        torch.testing.assert_close(torch.tensor(lp.top_logprobs), raw[b, lp.top_ids], atol=1e-5, rtol=0)
    assert out.logprobs[0].rank == 1
    assert out.logprobs[4].rank == 2  # the penalty moved greedy off the raw argmax; rank is against raw


# -- property test ------------------------------------------------------------------------------------

params_strategy = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 1e-6, 0.05, 0.5, 1.0, 1.7]),
        "top_k": st.sampled_from([-1, 0, 1, 2, 5, 50, 1500]),
        "top_p": st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.1, 1e-4]),
        "min_p": st.sampled_from([0.0, 0.01, 0.3, 1.0]),
        "repetition_penalty": st.sampled_from([1.0, 0.8, 1.3]),
        "frequency_penalty": st.sampled_from([0.0, 0.5, -1.0]),
        "presence_penalty": st.sampled_from([0.0, 1.0, -0.5]),
        "min_tokens": st.sampled_from([0, 2, 10]),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, 7), max_size=2),
        "seed": st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
        "logprobs": st.one_of(st.none(), st.integers(0, 20)),
        "max_tokens": st.none(),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.sampled_from([8, 33, 1100, 3000]),
    rows=st.lists(
        st.tuples(params_strategy, st.lists(st.integers(0, 7), max_size=12), st.integers(0, 2**31)),
        min_size=1,
        max_size=6,
    ),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_tokens_always_valid_and_in_support(
    vocab: int, rows: list[tuple[dict[str, object], list[int], int]], scale: float
) -> None:
    states = [state(prompt=[1, 3, 3], output=out, **kw) for kw, out, _ in rows]
    logits = torch.stack([randn(vocab, seed=seed, scale=scale) for _, _, seed in rows])
    out = Sampler()(logits, states)
    assert len(out.token_ids) == len(out.logprobs) == len(states)
    for b, (s, token) in enumerate(zip(states, out.token_ids, strict=True)):
        assert 0 <= token < vocab
        processed = ref_processed(logits[b], s)
        assert math.isfinite(processed[token])
        if s.params.temperature < GREEDY_EPS:
            assert processed[token] >= processed.max() - 1e-4
        else:
            assert ref_distribution(processed, s.params, slack=1e-4)[token] > 0
        assert (out.logprobs[b] is None) == (s.params.logprobs is None)
