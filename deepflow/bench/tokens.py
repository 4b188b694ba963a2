"""Where prompt tokens come from: a tokenizer (local folder or the server's `/tokenize`) and a word pool.

Prompts must have an exact token count on the *server's* tokenizer, whatever model it serves. Rather than
decoding random ids (which re-encode to a different length), we keep the common English words that the
tokenizer encodes, with a leading space, as exactly one token. Any sequence of such words is then a prompt of
known length, usable both as token ids (`/v1/completions`) and as text (chat), and the ids are valid,
non-special tokens of the server's vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np

__all__ = [
    "LocalTokenizer",
    "ServerTokenizer",
    "TextTokenizer",
    "WordPool",
    "build_word_pool",
    "resolve_tokenizer",
]

logger = logging.getLogger("deepflow.bench")

# Common English words; the pool keeps those that are one token (with a leading space) for the tokenizer.
_WORD_TEXT = """
the of and to in is was for on that with as by at from his her they this have are not but had which one
you were all she there would their will when who him been has more if no out so said what up its about
into than them can only other new some could time these two may then do first any my now such like our over
man me even most made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still own see men work long
get here between both life being under never day same another know while last might us great old year off
come since against go came right used take three small house water room form door place world city country
light music night sound voice story book paper letter garden river sea mountain tree flower bird horse dog
cat fish bread milk apple table chair window street road market school church office family child mother
father brother sister friend doctor teacher student king queen army war peace power money price business
company market bank value plan team game party member group history science nature energy health food
fire wind rain snow summer winter spring morning evening color red blue green black white open close
begin start stop turn walk run read write speak hear listen think feel believe remember forget learn teach
help give send bring carry hold keep leave find lose win play move live grow build break cut draw drive
fly eat drink sleep wait watch call ask answer show tell change follow lead meet pay buy sell
happy sad strong weak early late young rich poor simple free full empty warm cold hot dark bright clean
quiet loud deep high low near far fast slow hard soft heavy easy true real sure clear different important
public private national local social common special local human natural general political economic
"""
_WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))


class TextTokenizer(Protocol):
    """What prompt building needs from a tokenizer: ids of a text, without special tokens."""

    description: str

    def encode(self, text: str) -> list[int]: ...


class LocalTokenizer:
    """A Hugging Face model folder's tokenizer, run in-process by deepflow's engine tokenizer."""

    def __init__(self, folder: str | Path) -> None:
        from deepflow.engine.tokenizer import Tokenizer

        self._tokenizer = Tokenizer(folder)
        self.description = f"local folder {folder}"

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


class ServerTokenizer:
    """The server's own tokenizer through vLLM's `POST /tokenize` (exact for whatever model it serves)."""

    def __init__(self, root_url: str, model: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=root_url, headers=headers, timeout=timeout)
        self._model = model
        self.description = f"server {root_url}/tokenize"

    def encode(self, text: str) -> list[int]:
        body = {"model": self._model, "prompt": text, "add_special_tokens": False}
        response = self._client.post("/tokenize", json=body)
        response.raise_for_status()
        tokens = response.json()["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError(f"/tokenize answered {tokens!r} instead of a list of token ids")
        return tokens

    def close(self) -> None:
        self._client.close()


def resolve_tokenizer(
    folder: str | None, root_url: str, model: str, api_key: str | None = None, timeout: float = 30.0
) -> TextTokenizer:
    """`folder` if given; else the server's `/tokenize`; else the embedded SmolLM2 folder (with a warning)."""
    if folder is not None:
        return LocalTokenizer(folder)
    server = ServerTokenizer(root_url, model, api_key, timeout)
    try:
        server.encode(" hello world")
        return server
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        server.close()
        reason = f"{type(exc).__name__}: {exc}"
    from deepflow.weights.embedded import prepare_embedded_model

    path = prepare_embedded_model(progress=False)
    logger.warning(
        "the server's POST /tokenize failed (%s); building prompts with the embedded model's tokenizer "
        "(%s): lengths are exact only if the server's model uses the same tokenizer (else pass --tokenizer)",
        reason,
        path,
    )
    return LocalTokenizer(path)


@dataclass(frozen=True)
class WordPool:
    """Words that are one token each: `texts[i]` (with its leading space) encodes to exactly `ids[i]`."""

    ids: tuple[int, ...]
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        """`n` random pool indices (not token ids)."""
        return rng.integers(0, len(self.ids), size=n).tolist()

    def token_ids(self, indices: list[int]) -> list[int]:
        return [self.ids[i] for i in indices]

    def text(self, indices: list[int]) -> str:
        return "".join(self.texts[i] for i in indices)


MIN_POOL_SIZE = 16


def build_word_pool(tokenizer: TextTokenizer) -> WordPool:
    """Keep the words that encode alone to one token; one tokenizer call when the words never merge."""
    texts = [" " + w for w in _WORDS]
    joined = tokenizer.encode("".join(texts))
    if len(joined) == len(texts):  # each word gave at least one token, so each gave exactly one
        pairs = list(zip(joined, texts, strict=True))
    else:
        pairs = [(ids[0], t) for t in texts if len(ids := tokenizer.encode(t)) == 1]
    kept: dict[int, str] = {}
    for token_id, text in pairs:
        kept.setdefault(token_id, text)  # distinct words never share an id, but a pool must not repeat ids
    if len(kept) < MIN_POOL_SIZE:
        raise ValueError(
            f"only {len(kept)} common English words are single tokens for {tokenizer.description}; "
            "pass --tokenizer with the served model's folder"
        )
    return WordPool(ids=tuple(kept), texts=tuple(kept.values()))
