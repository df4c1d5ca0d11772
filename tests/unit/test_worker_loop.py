"""The worker's message loop over a real socket, with a fake model: a SetLogLevel takes
effect between two steps, and a level it does not know changes nothing."""
from __future__ import annotations

import logging
import os

import pytest
import zmq

from loraxd.protocol.codec import decode_from_worker, encode
from loraxd.protocol.worker import (FrameRejected, NewSeq, SamplingParams, SeqOutput,
                                    SetLogLevel, Shutdown, Step, StepResult)
from loraxd.worker.main import Worker


class FakeRunner:
    def execute(self, step: Step):
        ids = [s.req_id for s in step.new_seqs] + list(step.decode_ids)
        return [SeqOutput(i, 5, -0.5) for i in ids]

    def forget(self, ids):
        pass


class NoAdapters:
    """Nothing to install: a pipe that never becomes readable."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()

    def fileno(self) -> int:
        return self.read_fd

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"rank-0")
    router.bind("inproc://workers")
    dealer.connect("inproc://workers")
    level = logging.getLogger().level
    yield router, dealer
    logging.getLogger().setLevel(level)
    router.close(0)
    dealer.close(0)
    ctx.term()


def test_a_log_level_applies_from_the_next_step(sockets, caplog):
    router, dealer = sockets
    logging.getLogger().setLevel(logging.INFO)
    prefill = Step(1, new_seqs=[NewSeq(7, [1, 2], [0], SamplingParams())])
    for msg in (SetLogLevel("debug"), prefill, SetLogLevel("info"), Step(2, decode_ids=[7]),
                SetLogLevel("debug")):
        router.send_multipart([b"rank-0", encode(msg)])
    frame = bytearray(encode(SetLogLevel("info")))
    at = frame.index(b"info")
    frame[at:at + 4] = b"loud"  # a level no worker knows
    router.send_multipart([b"rank-0", bytes(frame)])
    router.send_multipart([b"rank-0", encode(Shutdown())])
    adapters = NoAdapters()
    try:
        Worker(FakeRunner(), dealer, 0, adapters).serve()  # returns at Shutdown
    finally:
        adapters.close()
    results = [decode_from_worker(router.recv_multipart()[1]) for _ in range(3)]
    assert [(type(r), r.step_id) for r in results[:2]] == [(StepResult, 1), (StepResult, 2)]
    assert isinstance(results[2], FrameRejected) and "loud" in results[2].message
    debug = [r.getMessage() for r in caplog.records
             if r.name == "loraxd.worker" and r.levelno == logging.DEBUG]
    assert len(debug) == 1 and debug[0].startswith("step 1: 1 prefilled, 0 decoded, 0 failed")
    assert any("rejecting an undecodable frame" in r.getMessage() for r in caplog.records)
    assert logging.getLogger().level == logging.DEBUG  # the last good level stays


class RecordingRunner(FakeRunner):
    def __init__(self, fail: bool = False):
        self.steps, self.forgotten, self.fail = [], [], fail

    def execute(self, step: Step):
        self.steps.append(step.step_id)
        if self.fail:
            raise ValueError("boom")
        return [SeqOutput(i, 5, -0.5) for i in step.prefill_chunks]

    def forget(self, ids):
        self.forgotten += list(ids)


def test_a_step_of_only_a_prompt_slice_or_pages_to_zero_reaches_the_runner():
    """No new and no decoding sequence, yet work: the next slice of a prompt (its last one
    samples a token), or a failed sequence's pages to zero. A worker that took such a step
    for a mere `forget` left the prompt unfinished while the scheduler moved on to decode
    it ("request N is not decoding here")."""
    runner = RecordingRunner()
    worker = Worker(runner, None, 0, None)
    result = worker.on_step(Step(3, prefill_chunks={7: 16}))
    assert runner.steps == [3] and [o.req_id for o in result.outputs] == [7]
    worker.on_step(Step(4, finished_ids=[7], clear_blocks=[2, 5]))
    assert runner.steps == [3, 4]


def test_a_failed_step_names_its_sliced_prompts_too():
    runner = RecordingRunner(fail=True)
    failed = Worker(runner, None, 0, None).on_step(
        Step(5, new_seqs=[NewSeq(1, [1, 2], [0], SamplingParams())], decode_ids=[2],
             prefill_chunks={3: 8}))
    assert sorted(failed.req_ids) == [1, 2, 3] and sorted(runner.forgotten) == [1, 2, 3]
