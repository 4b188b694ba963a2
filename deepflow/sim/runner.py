"""The simulated model runner: the real runner's interface (`execute(SchedulerOutput) -> ModelRunnerOutput`)
and its bookkeeping, without a model. It keeps each request's known tokens and computed position exactly as
`ModelRunner` does (diffs applied in the same order, decodes laid out first), samples a token for every
request whose scheduled tokens reach the end of its sequence, reports populates done with the step that
carried them, and reports the step time the cost model gives for the step's shape.

Sampled ids come from a `TokenSource`: deterministic pseudo tokens by default (EOS at a request's target
output length when it is below its max_tokens), or whatever a test feeds back.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from deepflow.engine.request import ModelRunnerOutput, SchedulerOutput
from deepflow.sim.costmodel import HardwareProfile, StepShape

__all__ = ["PseudoTokens", "SimRunner", "TokenSource"]

# (request id, index of the output token) -> its id
TokenSource = Callable[[str, int], int]


class PseudoTokens:
    """Deterministic token ids that are never EOS, except the one that ends a request at its target length.

    `targets[request_id]` (optional) is the output length at which the request stops by EOS."""

    def __init__(self, eos_token_id: int, low: int = 1000, high: int = 40000) -> None:
        self.eos = eos_token_id
        self.low, self.span = low, high - low
        self.targets: dict[str, int] = {}
        self._bases: dict[str, int] = {}

    def __call__(self, request_id: str, index: int) -> int:
        target = self.targets.get(request_id)
        if target is not None and index + 1 >= target:
            return self.eos
        base = self._bases.get(request_id)
        if base is None:
            base = self._bases[request_id] = zlib.crc32(request_id.encode())
        token = self.low + (base + index * 40503) % self.span
        return token + 1 if token == self.eos else token

    def forget(self, request_id: str) -> None:
        self.targets.pop(request_id, None)
        self._bases.pop(request_id, None)


def _not_decode(item: tuple[str, int]) -> bool:
    return item[1] != 1


class _State:
    __slots__ = ("computed", "known", "prompt_len")

    def __init__(self, known: int, computed: int, prompt_len: int) -> None:
        self.known = known  # prompt + outputs the runner knows
        self.computed = computed
        self.prompt_len = prompt_len


class SimRunner:
    def __init__(self, profile: HardwareProfile, tokens: TokenSource) -> None:
        self.profile = profile
        self.tokens = tokens
        self.requests: dict[str, _State] = {}
        self.num_steps = 0
        self.busy_seconds = 0.0

    def _apply(self, out: SchedulerOutput) -> None:
        requests = self.requests
        for request_id in out.preempted_request_ids:
            requests.pop(request_id, None)
        for request_id in out.finished_request_ids:
            requests.pop(request_id, None)
        for new in out.new_requests:
            prompt_len = len(new.prompt_token_ids)
            requests[new.request_id] = _State(
                prompt_len + len(new.output_token_ids), new.num_computed_tokens, prompt_len
            )

    def shape(self, out: SchedulerOutput) -> StepShape:
        """The step's features, before it runs (state as the scheduler's diff leaves it)."""
        shape = StepShape()
        for request_id, num_new in out.num_scheduled_tokens.items():
            shape.add(self.requests[request_id].computed, num_new)
        return shape

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._apply(out)
        copied = sum(len(t.src) for t in out.kv_transfers)
        profile = self.profile
        copy_seconds = profile.copy_seconds_per_block * copied
        request_ids: list[str] = []
        sampled: list[int] = []
        if out.total_num_scheduled_tokens:
            shape = StepShape()
            requests = self.requests
            # Decodes first, as the real runner lays the batch out: the order of its sampled ids (a stable
            # sort; skipped when the step is all decodes or all one prefill, the common cases).
            scheduled = out.num_scheduled_tokens
            order = scheduled.items()
            if len(scheduled) > 1 and (
                out.total_num_scheduled_tokens != len(scheduled) or min(scheduled.values()) != 1
            ):
                order = sorted(order, key=_not_decode)
            tokens = self.tokens
            # StepShape.add inlined (per request per step).
            num_tokens = 0
            decode_context = prefill_attention = 0.0
            for request_id, num_new in order:
                state = requests[request_id]
                start = state.computed
                num_tokens += num_new
                if num_new == 1:
                    decode_context += (start + 1) / 1e3
                else:
                    prefill_attention += num_new * (start + (num_new + 1) / 2) / 1e3
                state.computed = computed = start + num_new
                if computed == state.known:
                    request_ids.append(request_id)
                    sampled.append(tokens(request_id, computed - state.prompt_len))
                    state.known = computed + 1
            shape.tokens = num_tokens
            shape.sequences = len(scheduled)
            shape.decode_context = decode_context
            shape.prefill_attention = prefill_attention
            seconds = profile.step_seconds(shape, copied)
        else:  # copies or forgets only: no model call
            seconds = max(copy_seconds, profile.min_step_seconds)
        self.num_steps += 1
        self.busy_seconds += seconds
        return ModelRunnerOutput(
            request_ids=request_ids,
            sampled_token_ids=sampled,
            logprobs=[None] * len(sampled),
            finished_transfer_ids=[t.transfer_id for t in out.kv_transfers if t.transfer_id],
            num_tokens=out.total_num_scheduled_tokens,
            step_seconds=seconds,
            copied_blocks=copied,
            copy_seconds=copy_seconds,
        )
