"""Sampler: turns one engine step's next-token logits [B, V] into B tokens, each row under its own params.

Per row, in fp32, in this order:

1. min_tokens: while ``len(output) < min_tokens``, the ``stop_token_ids`` and, unless ``ignore_eos``, the
   model's EOS ids get -inf, so the request cannot end before its minimum. Ids >= V are skipped.
2. repetition_penalty (HF ``RepetitionPenaltyLogitsProcessor``): for every distinct token in prompt + output,
   a negative logit is multiplied by the penalty and any other logit divided by it.
3. frequency / presence penalties (OpenAI): over OUTPUT tokens only,
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
4. ``temperature < GREEDY_EPS`` (1e-5; 0 in practice): argmax of the processed logits. top_k / top_p / min_p
   and the seed are ignored and no random numbers are drawn.
5. Otherwise ``logits / temperature``, then top_k (keep exactly the k largest, ties broken arbitrarily),
   then top_p (keep the shortest prefix of the sorted distribution whose mass reaches top_p, computed on
   what top_k left; the top token is always kept), then min_p (drop tokens whose probability is below
   ``min_p * max probability``), then sample.

Sampling is the exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` i.i.d. picks i with
probability p_i. It is computed in its Gumbel-max form ``argmax(logit_i - log E_i)``, ``E_i = -log U_i``.
Because the noise is just a [V] tensor, a seeded request draws its V uniforms from its OWN generator (made
by `make_state`) and from nothing else, every step it samples: its tokens are the same whatever else is in
the batch and at whatever row it sits. Its noise is indexed by token id and drawn on the generator's device
(CPU for `make_state`), so it does not depend on which path below served the row either. Unseeded rows
share one batched draw from the sampler's generator (torch's default for the device when None).

top_k / top_p avoid a full sort of V: the row's K largest logits (``torch.topk``, K = max(256, largest
top_k)) are the candidates, and sampling happens among them. Rows that have top_k are exact that way; a
top_p-only row is exact once the candidates' mass reaches top_p, else it is retried with 16x the candidates
(up to V). Nothing is approximated: the candidates only bound the work.

Logprobs come from the RAW logits (log_softmax before any of the above), like vLLM's default: the sampled
token's logprob, its rank (1 + number of tokens with a strictly higher raw logprob) and the top
``params.logprobs`` entries in descending order.

``ignore_eos`` only changes step 1; the engine, not the sampler, decides whether to stop on EOS.

Fast path: when every row is greedy with no penalties, no min_tokens masking in effect and no logprobs, the
whole call is one ``argmax`` and one ``.tolist()``.

The model runner owns the per-sequence `RequestSamplingState` and appends each sampled token to
``output_token_ids`` itself. Outputs may only grow (or be cleared): the penalty history is converted to a
tensor incrementally and trusts that earlier entries never change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from deepflow.engine.sampling_params import SamplingParams

GREEDY_EPS = 1e-5  # below this, logits / temperature only amplifies fp noise: treat as greedy
_CANDIDATES = 256  # first guess at how many top tokens hold a top_p nucleus (real models: usually fewer)
_GROWTH = 16  # candidate growth factor for top_p rows whose nucleus the guess did not cover
_NEG_INF = float("-inf")


class _History:
    """Prompt + output ids in a growing CPU int64 buffer: penalties convert each token once, not per step."""

    __slots__ = ("buf", "n", "n_prompt")

    def __init__(self, prompt: Sequence[int]) -> None:
        self.n_prompt = len(prompt)
        self.buf = torch.empty(max(16, 2 * self.n_prompt), dtype=torch.long)
        self.buf[: self.n_prompt] = torch.tensor(list(prompt), dtype=torch.long)
        self.n = self.n_prompt

    def ids(self, output: Sequence[int]) -> torch.Tensor:
        """View of prompt + output ids; converts only the outputs appended since the last call."""
        total = self.n_prompt + len(output)
        if total < self.n:  # the runner cleared or truncated the outputs: reconvert them
            self.n = self.n_prompt
        if total > self.n:
            if total > len(self.buf):
                grown = torch.empty(max(total, 2 * len(self.buf)), dtype=torch.long)
                grown[: self.n] = self.buf[: self.n]
                self.buf = grown
            self.buf[self.n : total] = torch.tensor(list(output[self.n - self.n_prompt :]), dtype=torch.long)
            self.n = total
        return self.buf[:total]


@dataclass
class RequestSamplingState:
    """What the sampler needs to know about one live sequence; owned by the model runner."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the runner appends each sampled token itself (the sampler does not)
    eos_token_ids: frozenset[int]  # model EOS ids
    generator: torch.Generator | None  # from params.seed by `make_state`; None: the sampler's shared one
    _history: _History | None = field(default=None, init=False, repr=False, compare=False)

    def _token_ids(self) -> torch.Tensor:
        """Prompt + output ids as a CPU tensor (cached across steps)."""
        if self._history is None:
            self._history = _History(self.prompt_token_ids)
        return self._history.ids(self.output_token_ids)


def make_state(
    params: SamplingParams, prompt_token_ids: Sequence[int], eos_token_ids: Iterable[int]
) -> RequestSamplingState:
    """Fresh state for one sequence; a seeded request gets its own CPU generator so its draws are its own."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)  # manual_seed wants unsigned 64-bit
    return RequestSamplingState(
        params=params,
        prompt_token_ids=list(prompt_token_ids),
        output_token_ids=[],
        eos_token_ids=frozenset(eos_token_ids),
        generator=generator,
    )


@dataclass
class TokenLogprobs:
    """Raw-model logprob information for one sampled token."""

    token_id: int
    logprob: float
    rank: int  # rank of the sampled token under the raw logits (1 = most likely)
    top_ids: list[int]  # params.logprobs entries, most likely first
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_EPS


def _penalized(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )


def _banned_for_min_tokens(state: RequestSamplingState) -> set[int]:
    """Ids that must not be sampled yet because the request has not produced min_tokens; empty once it has."""
    params = state.params
    if len(state.output_token_ids) >= params.min_tokens:
        return set()
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned |= state.eos_token_ids
    return banned


def _needs_processing(state: RequestSamplingState) -> bool:
    """Whether the row's logits must be changed before choosing (penalties or min_tokens masking)."""
    return _penalized(state.params) or bool(_banned_for_min_tokens(state))


def _is_plain_greedy(state: RequestSamplingState) -> bool:
    params = state.params
    return _is_greedy(params) and params.logprobs is None and not _needs_processing(state)


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


def _flat_index(
    rows: list[int], ids: list[torch.Tensor], values: list[list[float]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index into logits.view(-1) of each (row, token) pair, with the row's values repeated alongside.

    Ids outside [0, V) are dropped: they would otherwise land in another row."""
    lengths = torch.tensor([len(t) for t in ids])
    tokens = torch.cat(ids)
    flat = tokens + torch.repeat_interleave(torch.tensor(rows) * vocab, lengths)
    per_token = torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), lengths, dim=0)
    valid = (tokens >= 0) & (tokens < vocab)
    if not bool(valid.all()):
        flat, per_token = flat[valid], per_token[valid]
    return flat.to(device), per_token.to(device)


class Sampler:
    """Stateless apart from the generator unseeded rows share; call once per engine step."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Must live on the logits' device; None: torch's default generator for that device.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [len(states)={len(states)}, V], got {tuple(logits.shape)}")
        if not states:
            return SamplerOutput(token_ids=[], logprobs=[])
        with torch.inference_mode():
            if all(_is_plain_greedy(s) for s in states):
                # fp32 first: also faster than a bf16 argmax on CPU; a no-op for fp32 logits.
                token_ids = logits.float().argmax(dim=-1).tolist()
                return SamplerOutput(token_ids=token_ids, logprobs=[None] * len(states))
            return self._general(logits, states)

    def _general(self, logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> SamplerOutput:
        batch = len(states)
        if any(_needs_processing(s) for s in states):
            x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            self._mask_min_tokens(x, states)
            self._apply_penalties(x, states)
        else:
            x = logits.float()  # may alias the caller's logits: only read from here on

        rows = [b for b, s in enumerate(states) if not _is_greedy(s.params)]
        if len(rows) == batch:
            tokens = self._sample(x, rows, states)
        else:
            tokens = x.argmax(dim=-1)
            if rows:
                tokens[_index(rows, x.device)] = self._sample(x, rows, states)

        token_ids: list[int] = tokens.tolist()
        return SamplerOutput(token_ids=token_ids, logprobs=self._logprobs(logits, tokens, token_ids, states))

    # -- logits processing (in place on our own fp32 copy) ----------------------------------------------

    @staticmethod
    def _mask_min_tokens(x: torch.Tensor, states: Sequence[RequestSamplingState]) -> None:
        vocab = x.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for b, state in enumerate(states):
            for token in _banned_for_min_tokens(state):
                if 0 <= token < vocab:
                    rows.append(b)
                    cols.append(token)
        if rows:
            x[_index(rows, x.device), _index(cols, x.device)] = _NEG_INF

    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: Sequence[RequestSamplingState]) -> None:
        vocab = x.shape[1]
        rep_rows: list[int] = []
        rep_ids: list[torch.Tensor] = []
        rep_vals: list[list[float]] = []
        out_rows: list[int] = []
        out_ids: list[torch.Tensor] = []
        out_vals: list[list[float]] = []
        for b, state in enumerate(states):
            params = state.params
            if not _penalized(params):
                continue
            ids = state._token_ids()
            if params.repetition_penalty != 1.0:
                rep_rows.append(b)
                rep_ids.append(ids)
                rep_vals.append([params.repetition_penalty])
            if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
                out_rows.append(b)
                out_ids.append(ids[len(state.prompt_token_ids) :])
                out_vals.append([params.frequency_penalty, params.presence_penalty])

        flat_x = x.view(-1)
        if rep_rows:
            # Gather/scatter like HF: a token seen twice is penalized once (duplicates write the same value).
            flat, penalty = _flat_index(rep_rows, rep_ids, rep_vals, vocab, x.device)
            seen = flat_x[flat]
            flat_x[flat] = torch.where(seen < 0, seen * penalty[:, 0], seen / penalty[:, 0])
        if out_rows:
            flat, pen = _flat_index(out_rows, out_ids, out_vals, vocab, x.device)
            if any(v[1] != 0.0 for v in out_vals):
                flat_x[flat] = flat_x[flat] - pen[:, 1]  # presence: once per distinct token
            if any(v[0] != 0.0 for v in out_vals):
                flat_x.index_put_((flat,), -pen[:, 0], accumulate=True)  # frequency: once per occurrence

    # -- sampling ------------------------------------------------------------------------------------------

    def _sample(
        self, x: torch.Tensor, rows: list[int], states: Sequence[RequestSamplingState]
    ) -> torch.Tensor:
        """Tokens for the non-greedy `rows` of the processed logits `x`: a device tensor in `rows` order."""
        device = x.device
        params = [states[b].params for b in rows]
        gens = [states[b].generator for b in rows]
        vocab = x.shape[1]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)[:, None]
        # Always a fresh tensor: x may alias the caller's logits.
        xs = x / temps if len(rows) == x.shape[0] else x.index_select(0, _index(rows, device)).div_(temps)

        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
        min_p = [p.min_p for p in params]
        truncated = [i for i in range(len(rows)) if top_k[i] or top_p[i] != math.inf]
        if len(truncated) == len(rows):
            return self._sample_truncated(xs, top_k, top_p, min_p, gens)
        if not truncated:
            return self._sample_full(xs, min_p, gens)

        full = [i for i in range(len(rows)) if not (top_k[i] or top_p[i] != math.inf)]
        full_t, trunc_t = _index(full, device), _index(truncated, device)
        out = torch.empty(len(rows), dtype=torch.long, device=device)
        out[full_t] = self._sample_full(
            xs.index_select(0, full_t), [min_p[i] for i in full], [gens[i] for i in full]
        )
        out[trunc_t] = self._sample_truncated(
            xs.index_select(0, trunc_t),
            [top_k[i] for i in truncated],
            [top_p[i] for i in truncated],
            [min_p[i] for i in truncated],
            [gens[i] for i in truncated],
        )
        return out

    def _sample_full(
        self, xs: torch.Tensor, min_p: list[float], gens: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Sample rows without top_k / top_p over all of V (`xs` is ours to modify)."""
        if any(mp > 0.0 for mp in min_p):
            log_min_p = torch.tensor(min_p, device=xs.device).log_()[:, None]  # log(0) = -inf: no-op
            xs.masked_fill_(xs < xs.amax(dim=-1, keepdim=True) + log_min_p, _NEG_INF)
        return xs.add_(self._gumbel(gens, xs.shape[1], None, xs.device)).argmax(dim=-1)

    def _sample_truncated(
        self,
        xs: torch.Tensor,
        top_k: list[int],
        top_p: list[float],
        min_p: list[float],
        gens: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample rows with top_k and/or top_p among their largest logits instead of sorting all of V.

        `top_k` 0 and `top_p` inf mean off. A top_p-only row whose nucleus is not covered by the candidates is
        retried with more; its noise is drawn only once it is served, so retries never consume its generator.
        """
        n_rows, vocab = xs.shape
        device = xs.device
        out = torch.empty(n_rows, dtype=torch.long, device=device)
        pending = list(range(n_rows))
        k = min(vocab, max(_CANDIDATES, *top_k))
        while pending:
            sub = xs if len(pending) == n_rows else xs.index_select(0, _index(pending, device))
            ks, ps = [top_k[i] for i in pending], [top_p[i] for i in pending]
            vals, idx, served = self._candidates(sub, ks, ps, k)
            done = [j for j, ok in enumerate(served) if ok]
            if done:
                if len(done) < len(pending):
                    done_t = _index(done, device)
                    vals, idx = vals.index_select(0, done_t), idx.index_select(0, done_t)
                rows_done = [pending[j] for j in done]
                mps = [min_p[i] for i in rows_done]
                if any(mp > 0.0 for mp in mps):
                    log_min_p = torch.tensor(mps, device=device).log_()[:, None]
                    vals.masked_fill_(vals < vals[:, :1] + log_min_p, _NEG_INF)  # column 0 is the max
                noise = self._gumbel([gens[i] for i in rows_done], vocab, idx, device)
                choice = idx.gather(1, vals.add_(noise).argmax(dim=-1, keepdim=True)).squeeze(1)
                if len(rows_done) == n_rows:
                    return choice
                out[_index(rows_done, device)] = choice
            pending = [pending[j] for j, ok in enumerate(served) if not ok]
            k = min(vocab, k * _GROWTH)
        return out

    @staticmethod
    def _candidates(
        x: torch.Tensor, top_k: list[int], top_p: list[float], k: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """The k largest logits per row (values, ids) with top_k / top_p applied as -inf, and whether each row
        is served: its kept tokens all lie among the candidates."""
        vocab = x.shape[1]
        device = x.device
        vals, idx = x.topk(k, dim=-1)  # sorted, largest first
        if any(top_k):
            keep = torch.tensor([kk or k for kk in top_k], device=device)[:, None]
            vals.masked_fill_(torch.arange(k, device=device) >= keep, _NEG_INF)
        served = [True] * len(top_k)
        if all(p == math.inf for p in top_p):
            return vals, idx, served
        has_k = torch.tensor([bool(kk) for kk in top_k], device=device)
        # Normalize over what top_k kept (all among the candidates) or, without top_k, over all of V.
        lse = torch.where(has_k, vals.logsumexp(dim=-1), x.logsumexp(dim=-1))
        probs = (vals - lse[:, None]).exp_()
        mass = probs.cumsum(dim=-1)
        p_t = torch.tensor(top_p, device=device)
        vals.masked_fill_(mass - probs >= p_t[:, None], _NEG_INF)
        if k < vocab and any(not kk and p != math.inf for kk, p in zip(top_k, top_p, strict=True)):
            # Covered when the first non-candidate would already be cut: the candidates' mass >= top_p.
            served = (has_k | (mass[:, -1] >= p_t)).tolist()
        return vals, idx, served

    def _gumbel(
        self,
        gens: list[torch.Generator | None],
        vocab: int,
        idx: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Gumbel noise -log(E), E = -log(U) ~ Exp(1): a row per sampled row, columns `idx` (None: all V).

        argmax(logit + noise) == argmax(p / E): the exponential race. A seeded row always draws all V uniforms
        from its own generator and picks its columns by token id, so its stream never depends on the batch.
        """
        n_rows = len(gens)
        width = vocab if idx is None else idx.shape[1]
        seeded = [i for i, g in enumerate(gens) if g is not None]
        if len(seeded) < n_rows:
            u = torch.rand(n_rows, width, device=device, generator=self.generator)
        else:
            u = torch.empty(n_rows, width, device=device)
        if seeded:
            draws = [torch.rand(vocab, generator=g, device=g.device) for g in gens if g is not None]
            own = torch.stack(draws).to(device)
            seeded_t = _index(seeded, device)
            if idx is not None:
                own = own.gather(1, idx.index_select(0, seeded_t))
            u[seeded_t] = own
        # U = 0 gives noise -inf (never chosen); U in (0, 1) keeps E in (0, 17], so no 0/0 or inf - inf.
        return u.log_().neg_().log_().neg_()

    # -- logprobs --------------------------------------------------------------------------------------------

    @staticmethod
    def _logprobs(
        logits: torch.Tensor,
        tokens: torch.Tensor,
        token_ids: list[int],
        states: Sequence[RequestSamplingState],
    ) -> list[TokenLogprobs | None]:
        rows = [b for b, s in enumerate(states) if s.params.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(states)
        if not rows:
            return result
        if len(rows) == len(states):
            raw, chosen = logits.float().log_softmax(dim=-1), tokens
        else:
            rows_t = _index(rows, logits.device)
            raw, chosen = logits.index_select(0, rows_t).float().log_softmax(dim=-1), tokens[rows_t]
        chosen_lp = raw.gather(1, chosen[:, None])
        ranks = ((raw > chosen_lp).sum(dim=-1) + 1).tolist()
        chosen_list = chosen_lp.squeeze(1).tolist()
        counts = [states[b].params.logprobs or 0 for b in rows]
        top_vals: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if max(counts) > 0:
            values, ids = raw.topk(min(max(counts), raw.shape[1]), dim=-1)
            top_vals, top_ids = values.tolist(), ids.tolist()
        for j, b in enumerate(rows):
            n = counts[j]
            result[b] = TokenLogprobs(
                token_id=token_ids[b],
                logprob=chosen_list[j],
                rank=ranks[j],
                top_ids=top_ids[j][:n],
                top_logprobs=top_vals[j][:n],
            )
        return result
