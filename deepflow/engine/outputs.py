"""Front-end output processing: engine-core token streams → text, logprobs, n>1 aggregation.

The engine core knows tokens only. Here each sequence is detokenized incrementally, stop strings are
checked on the new text (the core is then told to abort that sequence), and the `n` sequences of a request
are gathered into one `RequestOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deepflow.engine.detokenizer import IncrementalDetokenizer
from deepflow.engine.request import EngineCoreOutput, FinishReason, Logprobs
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What arrived since the previous RequestOutput of this request (streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprobs] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence `index` of an n>1 request: distinct seeds so the n samples differ yet stay reproducible."""
    import msgspec

    seed = None if params.seed is None else params.seed + index
    return msgspec.structs.replace(params, n=1, seed=seed)


class SequenceState:
    def __init__(
        self, index: int, params: SamplingParams, tokenizer: Tokenizer | None, prompt_ids: list[int]
    ):
        self.params = params
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self.restart(index)

    def restart(self, index: int) -> None:
        """Forget everything produced: the sequence starts over (its TE failed before it was shown)."""
        params = self.params
        self.output = CompletionOutput(index=index, logprobs=[] if params.logprobs is not None else None)
        self.detokenizer: IncrementalDetokenizer | None = None
        if self._tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer.from_params(self._tokenizer, self._prompt_ids, params)

    def apply(self, out: EngineCoreOutput) -> bool:
        """Fold one engine output in; True when a stop string ended the sequence (the core must abort it)."""
        seq = self.output
        seq.token_ids.extend(out.new_token_ids)
        seq.delta_token_ids.extend(out.new_token_ids)
        if seq.logprobs is not None:
            new_logprobs = [lp for lp in out.new_logprobs if lp is not None]
            seq.logprobs.extend(new_logprobs)
            seq.delta_logprobs.extend(new_logprobs)
        stopped_by_string = False
        if self.detokenizer is not None:
            update = self.detokenizer.update(out.new_token_ids)
            seq.delta_text += update.delta_text
            if update.stop_reason is not None:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP.value, update.stop_reason
                # The core still runs the sequence unless this very token also ended it there.
                stopped_by_string = out.finish_reason is None
        if out.finish_reason is not None and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = str(out.finish_reason), out.stop_reason
            if self.detokenizer is not None:
                seq.delta_text += self.detokenizer.flush()
        if self.detokenizer is not None:
            seq.text = self.detokenizer.output_text
        return stopped_by_string

    def take_delta(self) -> CompletionOutput:
        """A snapshot for the consumer; the delta fields are reset for the next one."""
        seq = self.output
        snapshot = CompletionOutput(
            index=seq.index,
            text=seq.text,
            token_ids=list(seq.token_ids),
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            delta_text=seq.delta_text,
            delta_token_ids=seq.delta_token_ids,
            delta_logprobs=seq.delta_logprobs,
        )
        seq.delta_text, seq.delta_token_ids, seq.delta_logprobs = "", [], []
        return snapshot


class RequestState:
    """One user request: its n sequences, each an engine-core request of its own."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_ids
        self.n = params.n
        self.sequences = {
            child_request_id(request_id, i, params.n): SequenceState(
                i, child_params(params, i), tokenizer, prompt_ids
            )
            for i in range(params.n)
        }
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.output.finished for s in self.sequences.values())

    def snapshot(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.take_delta() for s in self.sequences.values()],
            num_cached_tokens=self.num_cached_tokens,
        )


class OutputProcessor:
    """Routes engine-core outputs to request states; reports which child sequences hit a stop string."""

    def __init__(self) -> None:
        self.children: dict[str, tuple[RequestState, SequenceState]] = {}

    def add(self, state: RequestState) -> None:
        for child_id, seq in state.sequences.items():
            self.children[child_id] = (state, seq)

    def remove(self, state: RequestState) -> list[str]:
        """Forget a request; returns its child ids still running in the core (to abort them)."""
        live = []
        for child_id, seq in state.sequences.items():
            if self.children.pop(child_id, None) is not None and not seq.output.finished:
                live.append(child_id)
        return live

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestState], list[str]]:
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self.children.get(out.request_id)
            if entry is None:
                continue
            state, seq = entry
            if out.restarted:
                seq.restart(seq.output.index)
                continue
            if seq.output.finished:
                continue
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if seq.apply(out):
                to_abort.append(out.request_id)
            if seq.output.finished:
                del self.children[out.request_id]
            touched[state.request_id] = state
        return list(touched.values()), to_abort
