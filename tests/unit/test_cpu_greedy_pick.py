"""The sampler's argmax + logsumexp kernel (cpu_kernels/greedy_pick.cpp) against torch's
argmax and logsumexp: vocabularies that are and are not a multiple of the vector, ties (the
first maximum wins, as torch's), rows masked to -inf, NaN and inf rows, big batches over
threads; a row's results never depend on the other rows; the sampler's answers with and
without it."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.cpu_kernels import small_ops  # noqa: E402
from loraxd.worker.layers.sampler import SeqSampling, sample  # noqa: E402

REASON = cpu_kernels.enable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no CPU kernels: {REASON}")
INF = float("inf")


def pick(scores):
    index, top, lse = torch.ops.loraxd_cpu.greedy_pick(scores)
    return index, top, lse


def assert_as_torch(scores):
    index, top, lse = pick(scores)
    assert torch.equal(index, scores.argmax(-1))
    assert torch.equal(top, scores.max(-1).values)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6,
                               equal_nan=True)


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 7), (3, 17), (8, 49152), (5, 32001),
                                        (64, 1000)])
def test_random_rows_as_torch(rows, vocab):
    g = torch.Generator().manual_seed(rows * vocab)
    assert_as_torch(torch.randn(rows, vocab, generator=g) * 6)


def test_the_first_maximum_wins():
    scores = torch.zeros(4, 50)
    scores[0, [5, 21, 37]] = 3.0  # in three vector lanes' blocks
    scores[1, [20, 4]] = 3.0  # a later block's lane below an earlier one's
    scores[2, [49, 48]] = 3.0  # both in the tail
    scores[3, [2, 49]] = 3.0  # in a block and in the tail
    index, _, _ = pick(scores)
    assert index.tolist() == scores.argmax(-1).tolist() == [5, 4, 48, 2]


def test_masked_and_non_finite_rows():
    scores = torch.randn(6, 40)
    scores[0] = -INF  # nothing allowed: -inf, index 0
    scores[1] = -INF
    scores[1, 33] = 1.5  # a grammar allows one token
    scores[2, 7] = float("nan")
    scores[3, 12] = INF
    scores[4, 39] = float("nan")  # in the tail
    scores[5, :32] = -INF  # a masked block, the tail free
    index, top, lse = pick(scores)
    expected = torch.logsumexp(scores, -1)
    assert lse[0] == -INF and index[0] == 0
    assert index[1] == 33 and lse[1] == pytest.approx(1.5)
    assert torch.isnan(lse[2]) and torch.isnan(lse[4])
    assert lse[3] == INF and index[3] == 12
    torch.testing.assert_close(lse[5], expected[5])


def test_a_row_alone_and_in_a_batch_and_on_any_threads_agree():
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(40, 49152, generator=g) * 4  # big enough to fork
    threads = torch.get_num_threads()
    together = pick(batch)
    try:
        torch.set_num_threads(1)
        one_thread = pick(batch)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(together, one_thread):
        assert torch.equal(a, b)
    for row in (0, 17, 39):
        alone = pick(batch[row:row + 1].clone())
        assert all(torch.equal(a[0], b[row]) for a, b in zip(alone, together))


def test_the_sampler_answers_the_same_with_and_without_it(monkeypatch):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 5000, generator=g) * 3
    logits[6] = float("nan")  # a failed row
    params = [SamplingParams(), SamplingParams(num_alternatives=3),
              SamplingParams(repetition_penalty=1.3), SamplingParams(do_sample=True, seed=4)]

    def run():
        seqs = [SeqSampling(params[i % 4], [1, 2, 3], 2) for i in range(8)]
        return sample(logits, seqs)

    fused = run()
    monkeypatch.setattr(small_ops, "ENABLED", False)
    plain = run()
    assert fused.token_ids == plain.token_ids and fused.token_ids[6] == -1
    assert fused.top_ids == plain.top_ids and set(fused.failures) == set(plain.failures) == {6}
    torch.testing.assert_close(torch.tensor(fused.logprobs), torch.tensor(plain.logprobs),
                               rtol=1e-6, atol=1e-6, equal_nan=True)
