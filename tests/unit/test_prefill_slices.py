"""A prompt prefilled in slices, or after pages another sequence computed (the prefix cache),
gives the tokens a whole prefill gives: the worker's side of chunked prefill and prefix
caching, against transformers' own greedy decoding."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loraxd.protocol.worker import NewSeq, SamplingParams, SeqOutput, Step  # noqa: E402
from loraxd.worker.runner import ModelRunner, StepRejected  # noqa: E402
from tests.unit.test_model_fidelity import build_tiny_model, hf_greedy  # noqa: E402

BS = 4
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(23)]  # 23 tokens: 5 full pages and 3
NEW = 6
PAGES = 8  # prompt and new tokens


@pytest.fixture(scope="module", params=["llama-untied-llama3-rope", "mistral-sliding-window",
                                        "gemma2"])
def family(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    model = build_tiny_model(request.param, out_dir)
    runner = ModelRunner(str(out_dir), block_size=BS, max_batch_total_tokens=512,
                         num_threads=2)
    return runner, hf_greedy(model, PROMPT, NEW)


class Steps:
    def __init__(self, runner):
        self.runner, self.step_id = runner, 0

    def run(self, **fields):
        self.step_id += 1
        return self.runner.execute(Step(self.step_id, **fields))

    def decode(self, req_id: int, first: list, n: int = NEW) -> list[int]:
        """The tokens of a sequence from its first output on, decoding alone."""
        tokens = [first[0].token_id]
        while len(tokens) < n:
            out = self.run(decode_ids=[req_id])
            assert isinstance(out[0], SeqOutput), out
            tokens.append(out[0].token_id)
        return tokens


def pages(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def test_slices_give_the_whole_prefills_tokens(family):
    runner, expected = family
    steps = Steps(runner)
    blocks = pages(10, PAGES)
    # 5, then 9, then the last 9 tokens; each slice brings the pages it fills
    assert steps.run(new_seqs=[NewSeq(1, PROMPT, blocks[:2], SamplingParams(),
                                      num_computed=5)]) == []
    assert steps.run(prefill_chunks={1: 9}, new_blocks={1: blocks[2:4]}) == []
    out = steps.run(prefill_chunks={1: 9}, new_blocks={1: blocks[4:]})
    assert steps.decode(1, out) == expected
    runner.forget([1])


def test_a_slice_beside_decoding_sequences(family):
    """One step prefills a slice of one sequence, decodes another, and admits a third."""
    runner, expected = family
    steps = Steps(runner)
    first = steps.run(new_seqs=[NewSeq(2, PROMPT, pages(30, PAGES), SamplingParams())])
    tokens = {2: [first[0].token_id]}
    assert steps.run(new_seqs=[NewSeq(3, PROMPT, pages(40, 3), SamplingParams(),
                                      num_computed=10)], decode_ids=[2]) != []
    out = steps.run(prefill_chunks={3: 13}, new_blocks={3: pages(43, 5)}, decode_ids=[2],
                    new_seqs=[NewSeq(4, PROMPT, pages(50, PAGES), SamplingParams())])
    by_id = {o.req_id: o for o in out}
    assert set(by_id) == {2, 3, 4}
    assert steps.decode(3, [by_id[3]]) == expected
    assert steps.decode(4, [by_id[4]]) == expected
    runner.forget([2, 3, 4])


def test_pages_of_another_sequence_stand_in_for_a_prefill(family):
    runner, expected = family
    steps = Steps(runner)
    first = steps.run(new_seqs=[NewSeq(5, PROMPT, pages(60, PAGES), SamplingParams())])
    assert steps.decode(5, first) == expected
    # another sequence with the same first 5 pages (20 tokens): it computes only 3 tokens
    shared = pages(60, 5) + pages(70, 3)
    out = steps.run(new_seqs=[NewSeq(6, PROMPT, shared, SamplingParams(), num_cached=20)])
    assert steps.decode(6, out) == expected
    runner.forget([5, 6])


def test_slices_that_do_not_fit_are_refused(family):
    runner, _ = family
    with pytest.raises(StepRejected, match="cannot hold"):
        runner.execute(Step(90, new_seqs=[NewSeq(7, PROMPT, pages(80, 2), SamplingParams(),
                                                 num_computed=9)]))
    with pytest.raises(StepRejected, match="cached tokens"):
        runner.execute(Step(91, new_seqs=[NewSeq(7, PROMPT, pages(80, 6), SamplingParams(),
                                                 num_cached=23)]))
    with pytest.raises(StepRejected, match="prompt logprobs"):
        runner.execute(Step(92, new_seqs=[NewSeq(7, PROMPT, pages(80, 6),
                                                 SamplingParams(prompt_logprobs=True),
                                                 num_cached=8)]))
    with pytest.raises(StepRejected, match="not prefilling"):
        runner.execute(Step(93, prefill_chunks={99: 3}))
    assert not runner.seqs
