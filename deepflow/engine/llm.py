"""Offline API: `LLM(model).generate(prompts, params)` runs the engine core in the caller's thread."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore
from deepflow.engine.outputs import OutputProcessor, RequestOutput, RequestState
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, *, skip_tokenizer_init: bool = False, **engine_options: Any):
        """`skip_tokenizer_init`: token-id prompts only, no text (for model folders without a tokenizer)."""
        self.config = EngineConfig(model=model, **engine_options)
        self.core = EngineCore(self.config)
        self.tokenizer = None if skip_tokenizer_init else Tokenizer(self.core.model_path)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else frozenset()
        self.eos_token_ids = sorted(set(tokenizer_eos) | set(self.core.eos_token_ids))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or {"prompt_token_ids": [...]}); outputs in input order."""
        batch = self._as_batch(prompts)
        params_list = self._params_for(batch, sampling_params)
        encoded = [self._encode(p) for p in batch]
        return self._run(encoded, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params_list = self._params_for(conversations, sampling_params)
        encoded = []
        tokenizer = self._text_tokenizer()
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
            encoded.append((text, tokenizer.encode(text, add_special_tokens=False)))
        return self._run(encoded, params_list, use_tqdm)

    # ---- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _as_batch(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict):
            return [prompts]
        if prompts and isinstance(prompts[0], int):
            return [list(prompts)]  # type: ignore[arg-type]
        return list(prompts)

    @staticmethod
    def _params_for(batch: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None):
        if params is None:
            params = SamplingParams()
        params_list = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(batch):
            raise ValueError(f"got {len(params_list)} sampling params for {len(batch)} prompts")
        for p in params_list:
            p.validate()
        return params_list

    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; this LLM was made with skip_tokenizer_init")
        return self.tokenizer

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._text_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self._text_tokenizer().encode(prompt["prompt"])
        return None, list(prompt)

    def _run(
        self, encoded: list[tuple[str | None, list[int]]], params_list: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        processor = OutputProcessor()
        states: list[RequestState] = []
        for (text, ids), params in zip(encoded, params_list, strict=False):
            request_id = str(next(self._ids))
            state = RequestState(request_id, text, ids, params, self.tokenizer)
            states.append(state)
            processor.add(state)
            for child_id, seq in state.sequences.items():
                self.core.add_request(
                    EngineCoreRequest(
                        request_id=child_id,
                        prompt_token_ids=ids,
                        sampling_params=seq.params,
                        eos_token_ids=self.eos_token_ids,
                    )
                )
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(states), desc="generate", unit="req")
        done = 0
        try:
            while self.core.has_work():
                _, to_abort = processor.process(self.core.step())
                if to_abort:
                    self.core.abort(to_abort)
                if progress is not None:
                    finished = sum(s.finished for s in states)
                    progress.update(finished - done)
                    done = finished
        finally:
            if progress is not None:
                progress.close()
        return [s.snapshot() for s in states]

    def shutdown(self) -> None:
        self.core.shutdown()
