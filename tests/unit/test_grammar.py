"""Constrained decoding in the sampler: random logits, masked by real llguidance grammars over
the default model's tokenizer, must give text that validates against its schema; other rows
of the batch are untouched; a resumed sequence replays into the same grammar state."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from loraxd.engine.grammar import GrammarError, grammar_for_schema, schema_key
from loraxd.protocol.worker import SamplingParams
from loraxd.worker.layers.grammar import Grammars, SeqGrammar
from loraxd.worker.layers.sampler import SeqSampling, sample

EOS = 2  # SmolLM2's <|im_end|>
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
     "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["ok", "zip"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def env(default_model_dir):
    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return tok, vocab, Grammars(str(default_model_dir), vocab, [EOS])


def logits_at(step: int, rows: int, vocab: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1000 + step))


def run(seqs: list[SeqSampling], vocab: int, steps: int, first_step: int = 0) -> list[list[int]]:
    """Greedy over random logits until every constrained row emits EOS (or `steps`)."""
    out: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for step in range(first_step, first_step + steps):
        result = sample(logits_at(step, len(seqs), vocab), seqs)
        assert not result.failures, result.failures
        for i, (seq, token) in enumerate(zip(seqs, result.token_ids)):
            if not done[i]:
                seq.accept(token)
                out[i].append(token)
                done[i] = seq.grammar is not None and token == EOS
        if all(d for d, s in zip(done, seqs) if s.grammar is not None):
            break
    return out


def test_constrained_rows_validate_and_the_others_are_untouched(env):
    tok, vocab, grammars = env
    seqs = [SeqSampling(SamplingParams(), [1, 9], 2,
                        grammar=grammars.start(grammar_for_schema(schema_key(s)), []))
            for s in SCHEMAS]
    plain = SeqSampling(SamplingParams(), [1, 9], 2)
    outputs = run(seqs + [plain], vocab, steps=120)
    for schema, ids in zip(SCHEMAS, outputs):
        assert ids[-1] == EOS, f"no EOS after {len(ids)} tokens: {tok.decode(ids)!r}"
        jsonschema.validate(json.loads(tok.decode(ids[:-1])), schema)
    # the unconstrained row is the plain argmax of its own logits, step by step
    expected = [int(logits_at(s, 4, vocab)[3].argmax()) for s in range(len(outputs[3]))]
    assert outputs[3] == expected


def test_sampled_constrained_rows_validate(env):
    tok, vocab, grammars = env
    grammar = grammar_for_schema(schema_key(SCHEMAS[0]))
    for seed in range(3):
        seq = SeqSampling(SamplingParams(do_sample=True, temperature=1.5, seed=seed), [1], 1,
                          grammar=grammars.start(grammar, []))
        ids = run([seq], vocab, steps=120)[0]
        jsonschema.validate(json.loads(tok.decode(ids[:-1])), SCHEMAS[0])


def test_a_resumed_sequence_replays_its_grammar(env):
    _, vocab, grammars = env
    grammar = grammar_for_schema(schema_key(SCHEMAS[2]))
    whole = run([SeqSampling(SamplingParams(), [1], 1, grammar=grammars.start(grammar, []))],
                vocab, steps=120)[0]
    k = len(whole) // 2
    resumed = SeqSampling(SamplingParams(), [1] + whole[:k], 1,
                          grammar=grammars.start(grammar, whole[:k]))
    rest = run([resumed], vocab, steps=120, first_step=k)[0]
    assert whole[:k] + rest == whole


def test_without_the_replay_the_resume_would_diverge(env):
    """The test above can fail: a fresh matcher that skipped the replay goes elsewhere."""
    _, vocab, grammars = env
    grammar = grammar_for_schema(schema_key(SCHEMAS[2]))
    whole = run([SeqSampling(SamplingParams(), [1], 1, grammar=grammars.start(grammar, []))],
                vocab, steps=120)[0]
    k = len(whole) // 2
    fresh = SeqSampling(SamplingParams(), [1] + whole[:k], 1, grammar=grammars.start(grammar, []))
    assert whole[:k] + run([fresh], vocab, steps=120, first_step=k)[0] != whole


def test_a_broken_grammar_fails_its_row_alone(env):
    _, vocab, grammars = env
    broken = SeqSampling(SamplingParams(), [1], 1,
                         grammar=SeqGrammar(None, grammars, "the grammar cannot be built (x)"))
    plain = SeqSampling(SamplingParams(), [1], 1)
    result = sample(logits_at(0, 2, vocab), [broken, plain])
    assert result.token_ids[0] == -1 and result.token_ids[1] >= 0
    assert "cannot follow its response format" in result.failures[0].reason
    assert result.failures[0].bad_request


def test_grammars_are_cached_per_schema(env):
    _, _, grammars = env
    grammar = grammar_for_schema(schema_key(SCHEMAS[1]))
    grammars.start(grammar, [])
    built = grammars._built[grammar]
    grammars.start(grammar, [])
    assert grammars._built[grammar] is built


@pytest.mark.parametrize("schema,what", [
    ({"type": "object", "properties": {"a": {"not": {}}}}, 'Unimplemented keys: ["not"]'),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '"if"'),
    ({"type": "string", "pattern": "(("}, "regex parse error"),
    ({"type": "strnig"}, "strnig"),
])
def test_unsupported_schemas_name_what(schema, what):
    with pytest.raises(GrammarError, match=None) as err:
        grammar_for_schema(schema_key(schema))
    assert what in str(err.value)
