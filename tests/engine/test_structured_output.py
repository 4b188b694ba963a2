"""Grammar-constrained decoding: whatever the logits say, the masked output parses and fits the schema.

A random walk stands in for the model: random logits each step, the grammar's mask applied, the best
allowed token taken. If the mask ever allowed a token that leads outside the schema, some walk would find
it. The schemas come from hypothesis (objects of strings, bounded integers, booleans, enums, arrays and
nested objects)."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("xgrammar")

from deepflow.engine.structured_output import (
    GrammarCompilerCache,
    StructuredKind,
    StructuredOutputError,
    StructuredSpec,
    allocate_bitmask,
    apply_bitmask,
)
from deepflow.engine.tokenizer import Tokenizer

MAX_STEPS = 600


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def grammars(smollm2_dir, tok):
    return GrammarCompilerCache.from_tokenizer_json(
        smollm2_dir / "tokenizer.json", vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids)
    )


def walk(grammars, tok, spec: StructuredSpec, seed: int, batch: int = 1) -> list[str]:
    """Decode `batch` sequences at once under the grammar with random logits; their texts."""
    gen = torch.Generator().manual_seed(seed)
    states = [grammars.new_state(spec) for _ in range(batch)]
    mask = allocate_bitmask(batch, grammars.vocab_size)
    out: list[list[int]] = [[] for _ in range(batch)]
    live = list(range(batch))
    for _ in range(MAX_STEPS):
        if not live:
            break
        logits = torch.randn(batch, grammars.vocab_size, generator=gen)
        for i in live:
            states[i].fill(mask, i)
        apply_bitmask(logits, mask, live)
        for i in list(live):
            token = int(logits[i].argmax())
            assert logits[i, token] > float("-inf"), "the mask allowed nothing"
            assert states[i].accept(token), "the grammar refused a token its own mask allowed"
            if states[i].is_terminated:
                live.remove(i)
            else:
                out[i].append(token)
    assert not live, f"no end within {MAX_STEPS} tokens"
    return [tok.decode(ids, skip_special_tokens=True) for ids in out]


def test_json_object_accepts_objects_only(grammars, tok):
    # Any JSON object is unbounded (strings, nesting), so a random walk need not end: check acceptance.
    spec = StructuredSpec(kind=StructuredKind.JSON_OBJECT)
    good = grammars.new_state(spec)
    for t in tok.encode('{"a": [1, 2, {"b": null}], "c": "d"}', add_special_tokens=False):
        assert good.accept(t)
    assert good.accept(min(tok.eos_token_ids)) and good.is_terminated
    bad = grammars.new_state(spec)
    assert not all(bad.accept(t) for t in tok.encode("[1, 2]", add_special_tokens=False))


def test_a_schema_with_a_batch(grammars, tok):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    spec = StructuredSpec(kind=StructuredKind.JSON_SCHEMA, spec=json.dumps(schema))
    validator = jsonschema_rs.validator_for(schema)
    for text in walk(grammars, tok, spec, seed=2, batch=8):
        validator.validate(json.loads(text))


def test_regex(grammars, tok):
    spec = StructuredSpec(kind=StructuredKind.REGEX, spec=r"(yes|no), [0-9]{3}")
    for text in walk(grammars, tok, spec, seed=3, batch=4):
        assert text[:3] in ("yes", "no,") and text[-3:].isdigit()


BOUNDED = {
    "type": "object",
    "properties": {"v": {"type": "string", "maxLength": 10}},
    "required": ["v"],
    "additionalProperties": False,
}


def test_no_control_character_inside_a_bounded_string(grammars):
    """Regression (found by the property test below): xgrammar's maxLength strings let a raw tab or U+0001
    through, which json.loads refuses; every string of a grammar we compile excludes U+0000-U+001F."""
    for schema in (BOUNDED, {"type": "object"}):
        kind = StructuredKind.JSON_SCHEMA if schema is BOUNDED else StructuredKind.JSON_OBJECT
        spec = StructuredSpec(kind=kind, spec=json.dumps(schema))
        for ch in ("\t", "\x01", "\x1f", "\x00"):
            assert not grammars.new_state(spec)._m.accept_string('{"v": "a' + ch), repr(ch)
        assert grammars.new_state(spec)._m.accept_string('{"v": "a\u00e9')


def test_bad_specs_are_the_clients_error(grammars):
    with pytest.raises(StructuredOutputError):
        grammars.compile(StructuredSpec(kind=StructuredKind.JSON_SCHEMA, spec="{not json"))
    with pytest.raises(StructuredOutputError):
        grammars.compile(StructuredSpec(kind=StructuredKind.REGEX, spec="(unclosed"))


leaf = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 10)),
    st.builds(
        lambda a, b: {"type": "integer", "minimum": min(a, b), "maximum": max(a, b)},
        st.integers(-1000, 1000),
        st.integers(-1000, 1000),
    ),
    st.just({"type": "boolean"}),
    st.builds(
        lambda xs: {"enum": xs},
        st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=4, unique=True),
    ),
)


def objects(children):
    return st.builds(
        lambda props, required: {
            "type": "object",
            "properties": props,
            "required": sorted(k for k in props if required),
            "additionalProperties": False,
        },
        st.dictionaries(st.text("abcdefgh_", min_size=1, max_size=6), children, min_size=1, max_size=4),
        st.booleans(),
    )


schemas = st.recursive(
    leaf,
    lambda children: st.one_of(
        objects(children),
        st.builds(
            lambda item, n: {"type": "array", "items": item, "maxItems": n}, children, st.integers(0, 3)
        ),
    ),
    max_leaves=8,
).map(
    lambda s: (
        s
        if s.get("type") == "object"
        else {"type": "object", "properties": {"v": s}, "required": ["v"], "additionalProperties": False}
    )
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**31 - 1))
@example(schema=BOUNDED, seed=0)  # a bounded string: xgrammar let control characters into it
@example(schema={"type": "object", "properties": {"v": {"type": "string", "maxLength": 8}}, "required": ["v"],
                 "additionalProperties": False}, seed=7)  # fmt: skip
def test_random_schemas_always_parse_and_validate(grammars, tok, schema, seed):
    spec = StructuredSpec(kind=StructuredKind.JSON_SCHEMA, spec=json.dumps(schema))
    validator = jsonschema_rs.validator_for(schema)
    for text in walk(grammars, tok, spec, seed=seed, batch=2):
        validator.validate(json.loads(text))
