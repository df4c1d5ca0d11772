"""The scheduler driven directly: no processes, no torch."""
from __future__ import annotations

import pytest

from loraxd.config.tree import SchedulerConfig
from loraxd.engine.block_manager import BlockManager
from loraxd.engine.detokenizer import IncrementalDetokenizer
from loraxd.engine.request import FinishEvent, GenerationRequest, TokenEvent
from loraxd.engine.scheduler import BaseModelOnly, Scheduler, SchedulerLimits
from loraxd.engine.sequence import Sequence
from loraxd.protocol.worker import SeqOutput, StepResult

EOS = 0


class CharTokenizer:
    """Token i is the character chr(i); 0 is EOS (special)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != EOS)


def make_scheduler(num_blocks=64, block_size=4, prefill=64, ratio=1.2, max_waiting=20,
                   adapters=None, chunk=0):
    return Scheduler(SchedulerLimits(prefill, ratio, max_waiting, chunk),
                     BlockManager(num_blocks, block_size), eos_ids=frozenset({EOS}),
                     special_ids=frozenset({EOS}), decode_one=lambda i: chr(i),
                     adapters=adapters)


def make_seq(req_id, prompt="abc", max_new=4, stop=(), ignore_eos=False, **request):
    ids = [ord(c) for c in prompt]
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=max_new, stop=stop,
                            ignore_eos=ignore_eos, **request)
    return Sequence(req_id, req, IncrementalDetokenizer(CharTokenizer(), ids, frozenset({EOS})))


def run_step(s, tokens: dict[int, int]):
    plan = s.schedule()
    assert plan is not None
    ids = [n.req_id for n in plan.step.new_seqs] + list(plan.step.prefill_chunks)
    ids = [i for i in ids if i not in plan.partial] + plan.step.decode_ids
    outputs = [SeqOutput(i, tokens.get(i, ord("x")), -0.5) for i in ids]
    return plan, s.update(plan, StepResult(plan.step.step_id, outputs, 0.0))


def finishes(events):
    return {rid: e for rid, e in events if isinstance(e, FinishEvent)}


def test_prefill_then_decode_until_length():
    s = make_scheduler()
    s.add(make_seq(1, max_new=3))
    plan, events = run_step(s, {})
    assert [n.req_id for n in plan.step.new_seqs] == [1]
    assert plan.step.new_seqs[0].block_ids == [0]  # 3 prompt tokens fit one page of 4
    plan, events = run_step(s, {})
    assert plan.step.decode_ids == [1] and not plan.step.new_seqs
    plan, events = run_step(s, {})
    done = finishes(events)
    assert done[1].finish_reason == "length" and done[1].generated_text == "xxx"
    assert done[1].generated_tokens == 3 and done[1].prompt_tokens == 3
    assert s.schedule().step.finished_ids == [1]
    assert s.schedule() is None


def test_pages_are_appended_as_the_sequence_grows_and_freed_at_the_end():
    s = make_scheduler(block_size=4)
    s.add(make_seq(1, prompt="abcd", max_new=6))
    plan, _ = run_step(s, {})  # prefill: 4 tokens, 1 page
    assert plan.step.new_seqs[0].block_ids == [0]
    plan, _ = run_step(s, {})  # decode the 5th position: needs a 2nd page
    assert plan.step.new_blocks == {1: [1]}
    plan, _ = run_step(s, {})
    assert plan.step.new_blocks == {}
    for _ in range(3):
        run_step(s, {})
    assert s.blocks.num_free == s.blocks.num_blocks
    assert s.schedule().step.finished_ids == [1]


def test_eos_and_stop_sequences_finish_and_stop_text_is_cut():
    s = make_scheduler()
    s.add(make_seq(1, max_new=10))
    s.add(make_seq(2, max_new=10, stop=("yz",)))
    run_step(s, {1: ord("q"), 2: ord("y")})
    _, events = run_step(s, {1: EOS, 2: ord("z")})
    done = finishes(events)
    assert done[1].finish_reason == "eos_token" and done[1].generated_text == "q"
    assert done[2].finish_reason == "stop_sequence" and done[2].generated_text == ""
    eos_event = [e for rid, e in events if rid == 1 and isinstance(e, TokenEvent)][0]
    assert eos_event.special


def test_ignore_eos_keeps_going():
    s = make_scheduler()
    s.add(make_seq(1, max_new=2, ignore_eos=True))
    run_step(s, {1: EOS})
    _, events = run_step(s, {1: EOS})
    assert finishes(events)[1].finish_reason == "length"


def test_requests_join_a_running_batch_by_waiting_served_ratio():
    s = make_scheduler(ratio=1.0, max_waiting=100)
    s.add(make_seq(1, max_new=50))
    run_step(s, {})  # 1 running
    s.add(make_seq(2, max_new=50))  # 1 waiting >= 1 * 1.0 -> joins now
    plan, _ = run_step(s, {})
    assert [n.req_id for n in plan.step.new_seqs] == [2] and plan.step.decode_ids == [1]
    s.limits = SchedulerLimits(64, 2.0, 100)
    s.add(make_seq(3, max_new=50))  # 1 waiting < 2 * 2.0 -> waits
    plan, _ = run_step(s, {})
    assert not plan.step.new_seqs


def test_by_default_a_late_request_joins_at_the_next_step():
    # A burst that reaches the server over a few milliseconds must not leave its stragglers
    # waiting max_waiting_tokens steps behind the first arrivals, as LoRAX's ratio of 1.2 does.
    s = Scheduler(SchedulerLimits.from_config(SchedulerConfig()), BlockManager(64, 4),
                  eos_ids=frozenset({EOS}), special_ids=frozenset({EOS}),
                  decode_one=lambda i: chr(i))
    for req_id in range(1, 6):
        s.add(make_seq(req_id, max_new=50))
    run_step(s, {})  # 5 running
    s.add(make_seq(6, max_new=50))
    plan, _ = run_step(s, {})
    assert [n.req_id for n in plan.step.new_seqs] == [6]


def test_max_waiting_tokens_lets_a_lone_request_in():
    s = make_scheduler(ratio=10.0, max_waiting=3)
    s.add(make_seq(1, max_new=50))
    run_step(s, {})
    s.add(make_seq(2, max_new=50))
    joined_at = None
    for step in range(5):
        plan, _ = run_step(s, {})
        if plan.step.new_seqs:
            joined_at = step
            break
    assert joined_at == 2  # after max_waiting_tokens steps of the running batch


def test_admission_keeps_a_page_of_growth_each_and_respects_prefill_budget():
    s = make_scheduler(num_blocks=4, block_size=4, prefill=64)
    s.add(make_seq(1, prompt="abcd", max_new=4))   # 1 page now
    s.add(make_seq(2, prompt="abcd", max_new=4))   # 1 page, and 1 spare for the first
    s.add(make_seq(3, prompt="abcd", max_new=4))   # 1 page + 2 spare > the 2 left: waits
    plan, _ = run_step(s, {})
    assert [n.req_id for n in plan.step.new_seqs] == [1, 2]
    assert s.num_waiting == 1
    s2 = make_scheduler(prefill=5)
    s2.add(make_seq(1, prompt="abcd"))
    s2.add(make_seq(2, prompt="abcd"))
    plan = s2.schedule()
    assert [n.req_id for n in plan.step.new_seqs] == [1]  # 8 prompt tokens > 5


def test_abort_frees_pages_and_tells_workers():
    s = make_scheduler()
    s.add(make_seq(1, max_new=50))
    s.add(make_seq(2, max_new=50))
    run_step(s, {})
    assert s.abort(1)
    plan = s.schedule()
    assert plan.step.finished_ids == [1] and plan.step.decode_ids == [2]
    assert not s.abort(99)
    s.add(make_seq(3))
    assert s.abort(3) and s.num_waiting == 0


def test_result_for_a_request_aborted_mid_step_is_ignored():
    s = make_scheduler()
    s.add(make_seq(1, max_new=50))
    plan = s.schedule()
    s.abort(1)
    events = s.update(plan, StepResult(plan.step.step_id, [SeqOutput(1, 120, -1.0)], 0.0))
    assert events == []


class SlowAdapter(BaseModelOnly):
    def __init__(self):
        self.loaded = False

    def acquire(self, seq):
        if seq.request.adapter is None:
            return -1
        return 3 if self.loaded else None

    def release(self, seq):
        pass


def test_a_loading_adapter_does_not_block_others():
    from loraxd.engine.request import AdapterRef
    adapters = SlowAdapter()
    s = make_scheduler(adapters=adapters)
    ids = [ord("a")]
    slow = Sequence(1, GenerationRequest(ids, 4, adapter=AdapterRef("x", "local")),
                    IncrementalDetokenizer(CharTokenizer(), ids, frozenset()))
    s.add(slow)
    s.add(make_seq(2))
    plan = s.schedule()
    assert [n.req_id for n in plan.step.new_seqs] == [2]
    adapters.loaded = True
    s.limits = SchedulerLimits(64, 0.0, 20)
    plan = s.schedule()
    assert [(n.req_id, n.adapter_slot) for n in plan.step.new_seqs] == [(1, 3)]


def test_requeue_running_resumes_with_prompt_plus_generated_tokens():
    """The workers were replaced: running sequences go back to the head of the queue with
    their tokens, their pages are freed, and the next step prefills prompt + generated."""
    s = make_scheduler()
    s.add(make_seq(1, max_new=50))
    s.add(make_seq(2, prompt="de", max_new=50))
    for token in (ord("x"), ord("y")):
        run_step(s, {1: token, 2: token})
    s.add(make_seq(3, max_new=5))  # queued behind the running ones
    resumed = s.requeue_running()
    assert [q.req_id for q in resumed] == [1, 2]
    assert s.blocks.num_free == s.blocks.num_blocks and not s.running
    assert [q.req_id for q in s.waiting] == [1, 2, 3]
    plan = s.schedule()
    first = plan.step.new_seqs[0]
    assert plan.step.finished_ids == []  # the new workers never knew the old sequences
    assert first.prompt_ids == [ord(c) for c in "abcxy"] and first.num_generated == 2
    assert [n.req_id for n in plan.step.new_seqs] == [1, 2, 3]
    events = s.update(plan, StepResult(plan.step.step_id,
                                       [SeqOutput(i, ord("z"), -0.1) for i in (1, 2, 3)], 0.0))
    one = [e for i, e in events if i == 1]
    assert one[0].text == "z" and s.running[1].output.text == "xyz"
    assert s.running[1].num_cached == len("abcxy")  # the new token's K/V come next step


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉 ok"])
def test_incremental_detokenizer_handles_multibyte(text):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    # a byte-level tokenizer where every byte is its own token: multi-byte characters
    # arrive split across tokens, the hard case.
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, [], frozenset())
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_plans_say_why_new_sequences_join_a_running_batch():
    s = make_scheduler(ratio=1.0, max_waiting=3)
    s.add(make_seq(1, max_new=20))
    assert run_step(s, {})[0].join_reason is None  # nothing was running
    s.add(make_seq(2, max_new=20))
    plan, _ = run_step(s, {})
    assert [n.req_id for n in plan.step.new_seqs] == [2] and plan.join_reason == "backpressure"
    s.add(make_seq(3, max_new=20))  # 1 waiting < 2 running: waits max_waiting steps
    reasons = [run_step(s, {})[0] for _ in range(3)]
    assert [(bool(p.step.new_seqs), p.join_reason) for p in reasons] == [
        (False, None), (False, None), (True, "wait_exceeded")]


# -- chunked prefill, pages on demand, preemption, the prefix cache ---------------------------


def test_a_long_prompt_is_prefilled_in_slices_while_others_decode():
    s = make_scheduler(block_size=4, chunk=4, ratio=0.0)
    s.add(make_seq(1, prompt="ab", max_new=20))
    run_step(s, {})
    s.add(make_seq(2, prompt="abcdefghij", max_new=3))  # 10 tokens: slices of 4, 4, 2
    slices = []
    for _ in range(3):
        plan, events = run_step(s, {})
        assert plan.step.decode_ids == [1]  # the stream goes on every step
        slices.append([(n.req_id, n.num_computed) for n in plan.step.new_seqs]
                      or list(plan.step.prefill_chunks.items()))
    assert slices == [[(2, 4)], [(2, 4)], [(2, 2)]]
    assert [i for i, e in events if isinstance(e, TokenEvent)] == [2, 1]  # sampled at last
    assert len(s.running[2].block_ids) == 3 and s.running[2].num_cached == 10
    plan, _ = run_step(s, {})
    assert plan.step.decode_ids == [1, 2]


def test_while_others_decode_short_prompts_join_whole_and_long_ones_share_a_slice():
    s = make_scheduler(block_size=4, chunk=4, ratio=0.0, num_blocks=128)
    s.add(make_seq(1, prompt="ab", max_new=50))
    run_step(s, {})
    s.add(make_seq(2, prompt="abcdefghij", max_new=3))  # long: a slice
    s.add(make_seq(3, prompt="abcdefghijkl", max_new=3))  # long: no slice left, waits
    plan, _ = run_step(s, {})
    assert [(n.req_id, n.num_computed) for n in plan.step.new_seqs] == [(2, 4)]
    s.add(make_seq(4, prompt="abc", max_new=3))
    s.add(make_seq(5, prompt="abcd", max_new=3))
    plan, _ = run_step(s, {})  # 2 goes on; 3 still waits, and the short ones behind it
    assert plan.step.prefill_chunks == {2: 4} and not plan.step.new_seqs
    s2 = make_scheduler(block_size=4, chunk=4, ratio=0.0, num_blocks=128)
    s2.add(make_seq(1, prompt="ab", max_new=50))
    run_step(s2, {})
    for i in range(2, 8):  # a burst of short prompts joins in one step
        s2.add(make_seq(i, prompt="abc", max_new=3))
    plan, _ = run_step(s2, {})
    assert [n.num_computed for n in plan.step.new_seqs] == [3] * 6


def test_an_idle_engine_prefills_up_to_max_batch_prefill_tokens_at_once():
    s = make_scheduler(chunk=4, prefill=64)
    s.add(make_seq(1, prompt="abcdefghij"))
    plan, _ = run_step(s, {})
    assert plan.step.new_seqs[0].num_computed == 10 and not plan.partial


def test_prompt_logprobs_are_never_sliced_nor_cached():
    from loraxd.protocol.worker import SamplingParams
    s = make_scheduler(block_size=4, chunk=4, ratio=0.0)
    s.add(make_seq(1, prompt="abcdefghij", max_new=20))
    run_step(s, {})
    s.add(make_seq(2, prompt="abcdefghij", sampling=SamplingParams(prompt_logprobs=True)))
    plan, _ = run_step(s, {})
    (new,) = plan.step.new_seqs
    assert (new.num_cached, new.num_computed) == (0, 10) and not plan.partial


def test_pages_run_out_the_newest_sequence_is_preempted_and_resumes():
    s = make_scheduler(num_blocks=4, block_size=4, ratio=0.0)
    s.add(make_seq(1, prompt="abcd", max_new=8, ignore_eos=True))
    s.add(make_seq(2, prompt="efgh", max_new=8, ignore_eos=True))
    run_step(s, {})  # 1 page each, 2 spare
    for _ in range(4):  # both grow into a 2nd page
        run_step(s, {})
    assert s.blocks.num_free == 0 and s.num_preempted == 0
    plan, _ = run_step(s, {})  # both need a 3rd page: 2, the newest, makes room
    assert s.num_preempted == 1 and plan.step.decode_ids == [1]
    assert plan.step.finished_ids == [2] and [q.req_id for q in s.waiting] == [2]
    assert s.running[1].block_ids[-1] in plan.step.new_blocks[1]
    generated = list(s.waiting[0].output_ids)
    for _ in range(10):
        plan, events = run_step(s, {})
        resumed = [n for n in plan.step.new_seqs if n.req_id == 2]
        if resumed:
            break
    assert resumed[0].prompt_ids == [ord(c) for c in "efgh"] + generated
    assert resumed[0].num_generated == len(generated)
    assert resumed[0].num_cached == 4  # its first page, kept in the prefix cache


def test_a_repeated_context_takes_its_cached_pages():
    s = make_scheduler(block_size=4)
    s.add(make_seq(1, prompt="abcdefghijkl", max_new=2))  # 3 full pages
    run_step(s, {})
    pages = list(s.running[1].block_ids[:3])
    run_step(s, {})
    assert s.schedule().step.finished_ids == [1] and s.blocks.num_cached == 3
    s.add(make_seq(2, prompt="abcdefghijkl", max_new=2))
    plan, _ = run_step(s, {})
    (new,) = plan.step.new_seqs
    # the last page is computed again: the last token's logits are needed
    assert (new.num_cached, new.num_computed) == (8, 4) and new.block_ids[:2] == pages[:2]
    assert (s.prefix_hit_tokens, s.prefix_queried_tokens) == (8, 24)
    s.add(make_seq(3, prompt="abcdXfghijkl", max_new=2))  # differs in page 2: 1 page hit
    plan, _ = run_step(s, {})
    assert plan.step.new_seqs[0].num_cached == 4


def test_pages_in_use_are_shared_and_freed_once_by_each():
    s = make_scheduler(block_size=4, ratio=0.0)
    s.add(make_seq(1, prompt="abcdefghi", max_new=10))
    run_step(s, {})
    s.add(make_seq(2, prompt="abcdefghz", max_new=10))
    plan, _ = run_step(s, {})
    assert plan.step.new_seqs[0].block_ids[:2] == s.running[1].block_ids[:2]
    used = s.blocks.num_used
    s.abort(1)
    assert s.blocks.num_used == used - 1  # its own page only: the shared two stay in use
    s.abort(2)
    assert s.blocks.num_used == 0


class TwoLoads(BaseModelOnly):
    """An adapter whose K/V identity changes when it is loaded again."""

    def __init__(self):
        self.load = 1

    def acquire(self, seq):
        return -1 if seq.request.adapter is None else 0

    def kv_identity(self, seq):
        return "base" if seq.request.adapter is None else ("a", self.load)


def test_pages_never_serve_another_adapter_or_another_load():
    from loraxd.engine.request import AdapterRef
    adapters = TwoLoads()
    s = make_scheduler(block_size=4, adapters=adapters, ratio=0.0)
    a = AdapterRef("a", "local")
    s.add(make_seq(1, prompt="abcdefghi", max_new=1, adapter=a))
    run_step(s, {})
    s.add(make_seq(2, prompt="abcdefghi", max_new=1))  # the base model: no hit
    s.add(make_seq(3, prompt="abcdefghi", max_new=1, adapter=a))  # the same load: a hit
    plan, _ = run_step(s, {})
    assert [(n.req_id, n.num_cached) for n in plan.step.new_seqs] == [(2, 0), (3, 8)]
    adapters.load = 2  # unloaded and loaded again: its files may have changed
    s.add(make_seq(4, prompt="abcdefghi", max_new=1, adapter=a))
    plan, _ = run_step(s, {})
    assert [(n.req_id, n.num_cached) for n in plan.step.new_seqs] == [(4, 0)]


def test_a_failed_sequence_has_its_pages_zeroed_and_never_cached():
    from loraxd.protocol.worker import SeqFailure
    s = make_scheduler(block_size=4)
    s.add(make_seq(1, prompt="abcdefghi", max_new=5))
    plan, _ = run_step(s, {})
    pages = list(s.running[1].block_ids)
    s.update(plan, StepResult(plan.step.step_id, [], 0.0, [SeqFailure(1, "NaN")]))
    plan = s.schedule()
    assert plan.step.finished_ids == [1] and sorted(plan.step.clear_blocks) == sorted(pages)
    s.add(make_seq(2, prompt="abcdefghi", max_new=5))
    assert s.schedule().step.new_seqs[0].num_cached == 0


def test_replaced_workers_take_the_prefix_cache_with_them():
    s = make_scheduler(block_size=4)
    s.add(make_seq(1, prompt="abcdefghi", max_new=5))
    run_step(s, {})
    run_step(s, {})
    s.requeue_running()
    assert s.blocks.num_cached == 0 and s.blocks.num_free == s.blocks.num_blocks
    assert s.schedule().step.new_seqs[0].num_cached == 0


def test_without_prefix_caching_nothing_is_kept():
    s = Scheduler(SchedulerLimits(64, 1.2, 20), BlockManager(16, 4, prefix_caching=False),
                  eos_ids=frozenset({EOS}), special_ids=frozenset({EOS}),
                  decode_one=chr)
    s.add(make_seq(1, prompt="abcdefghi", max_new=1))
    run_step(s, {})
    s.add(make_seq(2, prompt="abcdefghi", max_new=1))
    plan, _ = run_step(s, {})
    assert plan.step.new_seqs[0].num_cached == 0 and s.blocks.num_cached == 0
