"""The sampler against its definition and against transformers' logits processors."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker.layers.sampler import (SeqSampling, prompt_logprobs, sample,  # noqa: E402
                                          top_k_filter, top_p_filter, typical_filter)

VOCAB = 50


def seqs_for(params: list[SamplingParams], prompt=(1, 2, 3)) -> list[SeqSampling]:
    return [SeqSampling(p, list(prompt), len(prompt)) for p in params]


@pytest.fixture
def logits():
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax_with_logprob(logits):
    out = sample(logits, seqs_for([SamplingParams()] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    assert out.top_ids == [[]] * 4


def test_alternatives_best_first(logits):
    out = sample(logits, seqs_for([SamplingParams(num_alternatives=3),
                                   SamplingParams(num_alternatives=0),
                                   SamplingParams(do_sample=True, seed=1, num_alternatives=2),
                                   SamplingParams(num_alternatives=1)]))
    logprobs = torch.log_softmax(logits, -1)
    top = torch.topk(logprobs, 3)
    assert out.top_ids[0] == top.indices[0].tolist()
    assert out.top_logprobs[0] == pytest.approx(top.values[0].tolist(), abs=1e-5)
    assert out.top_ids[1] == [] and len(out.top_ids[2]) == 2 and len(out.top_ids[3]) == 1


def test_seeded_sampling_is_reproducible_whatever_the_batch(logits):
    params = SamplingParams(do_sample=True, temperature=1.5, seed=42)
    batch = logits.clone()
    batch[3] = logits[0]
    alone = sample(logits[:1], seqs_for([params]))
    shared = sample(batch, seqs_for([params, SamplingParams(do_sample=True, seed=7),
                                     SamplingParams(), params]))
    assert alone.token_ids[0] == shared.token_ids[0] == shared.token_ids[3]
    # each draw is seeded by its index in the sequence: draw several steps in a row
    seq_alone = seqs_for([params])
    seq_shared = seqs_for([SamplingParams(do_sample=True, seed=3), params])
    run_alone = [draw(logits[:1], seq_alone)[0] for _ in range(20)]
    run_shared = [draw(batch[2:4], seq_shared)[1] for _ in range(20)]
    assert run_alone == run_shared
    assert len(set(run_alone)) > 1  # it does sample


def draw(logits, seqs) -> list[int]:
    """One step as the runner takes it: sample, then each sequence keeps its token."""
    tokens = sample(logits, seqs).token_ids
    for seq, token in zip(seqs, tokens):
        seq.token_ids.append(token)
    return tokens


def test_a_resumed_sequence_draws_what_the_first_one_would_have(logits):
    """A worker that takes over a sequence gets prompt + generated ids with the prompt's
    length: its next draws and penalties are the uninterrupted run's."""
    params = SamplingParams(do_sample=True, temperature=1.5, seed=11, frequency_penalty=0.3)
    prompt = [1, 2, 3]
    first = seqs_for([params], prompt)
    run = [draw(logits[:1], first)[0] for _ in range(12)]
    resumed = [SeqSampling(params, prompt + run[:5], len(prompt))]
    assert [draw(logits[:1], resumed)[0] for _ in range(7)] == run[5:]


def test_top_k_1_and_tiny_top_p_equal_greedy(logits):
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(do_sample=True, top_k=1, seed=5, temperature=2.0),
                   SamplingParams(do_sample=True, top_p=1e-6, seed=5, temperature=2.0)):
        for _ in range(5):
            assert sample(logits, seqs_for([params] * 4)).token_ids == greedy


def test_sampled_logprob_is_after_temperature(logits):
    params = SamplingParams(do_sample=True, temperature=0.7, seed=3)
    out = sample(logits, seqs_for([params] * 4))
    logprobs = torch.log_softmax(logits / 0.7, -1)
    for row, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp == pytest.approx(logprobs[row, token].item(), abs=1e-5)


def test_repetition_penalty_matches_transformers(logits):
    from transformers import RepetitionPenaltyLogitsProcessor
    prompt = [3, 7, 7, 11, 49]
    seqs = [SeqSampling(SamplingParams(repetition_penalty=1.3), prompt + [0, 2], len(prompt))
            for _ in range(4)]
    ids = torch.tensor([prompt + [0, 2]] * 4)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    out = sample(logits, seqs)
    assert out.token_ids == expected.argmax(-1).tolist()
    lp = torch.log_softmax(expected, -1)
    assert out.logprobs == pytest.approx(lp.max(-1).values.tolist(), abs=1e-5)


def test_repetition_penalty_changes_greedy_choice():
    row = torch.zeros(1, VOCAB)
    row[0, 4], row[0, 9] = 2.0, 1.9
    seqs = [SeqSampling(SamplingParams(repetition_penalty=1.2), [4], 1)]
    assert sample(row, seqs).token_ids == [9]


def test_frequency_and_presence_penalties_openai_semantics():
    row = torch.zeros(1, VOCAB)
    row[0, 4], row[0, 9] = 2.0, 1.0
    # token 4 appeared twice in the generated part (not the prompt): 2 - 2*0.3 - 0.5 = 0.9
    params = SamplingParams(do_sample=True, top_k=1, frequency_penalty=0.3,
                            presence_penalty=0.5, seed=0)
    seqs = [SeqSampling(params, [4, 4, 1, 4, 4], 3)]
    out = sample(row, seqs)
    assert out.token_ids == [9]
    penalised = row.clone()
    penalised[0, 4] = 0.9
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(penalised, -1)[0, 9].item(),
                                            abs=1e-5)
    # the prompt's occurrences do not count
    assert sample(row, [SeqSampling(params, [4, 4, 4, 1], 4)]).token_ids == [4]


def test_typical_p_matches_transformers():
    from transformers import TypicalLogitsWarper
    scores = torch.log(torch.tensor([[0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]]))
    scores = torch.cat([scores, scores.flip(-1)])
    for mass in (0.2, 0.5, 0.9):
        expected = TypicalLogitsWarper(mass)(None, scores.clone())
        assert torch.equal(typical_filter(scores.clone(), [mass, mass]), expected)
    mixed = typical_filter(scores.clone(), [0.5, 1.0])
    assert torch.equal(mixed[0], TypicalLogitsWarper(0.5)(None, scores[:1].clone())[0])
    assert torch.equal(mixed[1], scores[1])


def test_top_k_and_top_p_match_transformers(logits):
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    assert torch.equal(top_k_filter(logits.clone(), [5] * 4),
                       TopKLogitsWarper(5)(None, logits.clone()))
    assert torch.equal(top_p_filter(logits.clone(), [0.8] * 4),
                       TopPLogitsWarper(0.8)(None, logits.clone()))
    mixed = top_k_filter(logits.clone(), [0, 3, 0, 1])
    assert torch.equal(mixed[0], logits[0]) and torch.isinf(mixed[1]).sum() == VOCAB - 3


def test_sampled_tokens_stay_inside_top_k(logits):
    params = SamplingParams(do_sample=True, top_k=3, seed=9)
    allowed = torch.topk(logits, 3).indices.tolist()
    seqs = seqs_for([params] * 4)
    for _ in range(20):
        for row, token in enumerate(sample(logits, seqs).token_ids):
            assert token in allowed[row]


def test_prompt_logprobs():
    rows = torch.randn(5, VOCAB)
    prompt = [4, 8, 15, 16, 23]
    expected = torch.log_softmax(rows, -1)[torch.arange(4), torch.tensor(prompt[1:])]
    assert prompt_logprobs(rows, prompt) == pytest.approx(expected.tolist(), abs=1e-5)
    assert prompt_logprobs(rows[:1], prompt[:1]) == []


def test_zero_temperature_sampling_is_greedy(logits):
    out = sample(logits, seqs_for([SamplingParams(do_sample=True, temperature=0.0)] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert all(math.isfinite(lp) for lp in out.logprobs)


def test_frequency_and_presence_penalties_apply_to_greedy_too():
    from loraxd.protocol.worker import SamplingParams
    from loraxd.worker.layers.sampler import SeqSampling, sample
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    plain = SeqSampling(SamplingParams(), token_ids=[2, 0], prompt_len=1)
    assert sample(logits, [plain]).token_ids == [0]
    penalised = SeqSampling(SamplingParams(frequency_penalty=0.5), token_ids=[2, 0],
                            prompt_len=1)
    assert sample(logits, [penalised]).token_ids == [1]  # token 0 appeared once: 2.0-0.5
    present = SeqSampling(SamplingParams(presence_penalty=0.2), token_ids=[2, 0], prompt_len=1)
    assert sample(logits, [present]).token_ids == [1]


# -- a row that cannot be sampled fails alone ---------------------------------------------------


HEALTHY = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=5)]


def with_healthy(logits, params: SamplingParams, row=None):
    """Sample `params` on logits[0] (or `row`) beside two healthy rows; also the healthy
    rows alone, with fresh generators, to compare."""
    batch = logits[:3].clone()
    if row is not None:
        batch[0] = row
    out = sample(batch, seqs_for([params] + HEALTHY))
    alone = sample(logits[1:3], seqs_for(HEALTHY))
    assert out.token_ids[1:] == alone.token_ids and out.logprobs[1:] == alone.logprobs
    assert set(out.failures) <= {0}
    return out


def test_a_tiny_temperature_samples_greedily(logits):
    """logits / 1e-50 overflows float32: the limit of the distribution is the argmax."""
    out = with_healthy(logits, SamplingParams(do_sample=True, temperature=1e-50, seed=1))
    assert out.failures == {} and out.token_ids[0] == logits[0].argmax().item()
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1).max().item(),
                                            abs=1e-5)


@pytest.mark.parametrize("do_sample", [False, True])
def test_penalties_that_overflow_fail_their_row_as_a_bad_request(logits, do_sample):
    prompt_max = logits[0, 1:4].abs().max().item()  # the prompt (1, 2, 3) is penalised
    row = logits[0].clone()
    row[1:4] = prompt_max  # positive: divided by the penalty
    out = with_healthy(logits, SamplingParams(do_sample=do_sample, repetition_penalty=1e-50,
                                              seed=1), row)
    failure = out.failures[0]
    assert failure.bad_request and out.token_ids[0] == -1
    assert "repetition_penalty=1e-50" in failure.reason and "overflow" in failure.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(do_sample=True, seed=1),
                                    SamplingParams(repetition_penalty=1.2)])
def test_non_finite_logits_fail_their_row_as_the_models_fault(logits, bad, params):
    row = logits[0].clone()
    if bad == -math.inf:
        row[:] = bad  # nothing left to choose from
    else:
        row[7] = bad
    out = with_healthy(logits, params, row)
    assert out.token_ids[0] == -1 and not out.failures[0].bad_request
    assert "not finite" in out.failures[0].reason


def test_a_filter_that_leaves_nothing_fails_its_row(logits, monkeypatch):
    from loraxd.worker.layers import sampler

    def drop_row_0(scores, top_k):
        out = top_k_filter(scores, top_k)
        out[0] = -math.inf
        return out
    monkeypatch.setattr(sampler, "top_k_filter", drop_row_0)
    params = SamplingParams(do_sample=True, top_k=5, seed=1)
    batch = logits[:2]
    out = sample(batch, seqs_for([params, params]))
    reason = out.failures[0].reason
    assert out.token_ids[0] == -1 and out.failures[0].bad_request
    assert "top_k=5" in reason and "no token to sample" in reason
    monkeypatch.undo()
    assert out.token_ids[1] == sample(batch[1:], seqs_for([params])).token_ids[0]
