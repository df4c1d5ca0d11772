import pytest

from loraxd.protocol.codec import (PROTOCOL_VERSION, DecodeError, decode_from_worker,
                                   decode_to_worker, encode)
from loraxd.logs import LEVELS
from loraxd.protocol.worker import (Hello, LoadAdapter, NewSeq, Ready, SamplingParams,
                                    SeqOutput, SetLogLevel, Shutdown, Step, StepResult)


@pytest.mark.parametrize("msg", [
    Step(3, [NewSeq(7, [1, 2, 3], [0, 1], SamplingParams(do_sample=True, seed=2**64 - 1), 2)],
         [4, 5], {4: [9]}, [1]),
    LoadAdapter(1, "local:a", "/x"),
    *(SetLogLevel(level) for level in LEVELS),
    Shutdown(),
])
def test_to_worker_round_trip(msg):
    assert decode_to_worker(encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    Hello(PROTOCOL_VERSION, 0, 1, 123),
    Ready(0, 10, 16, 100, [2], 2048, "float32", "cpu", "LlamaForCausalLM"),
    StepResult(1, [SeqOutput(7, 5, -0.25, [5, 6], [-0.25, -2.0], [-1.0])], 0.01),
])
def test_from_worker_round_trip(msg):
    assert decode_from_worker(encode(msg)) == msg


def test_direction_and_garbage_are_refused():
    with pytest.raises(DecodeError):
        decode_to_worker(encode(Hello(PROTOCOL_VERSION, 0, 1, 1)))
    with pytest.raises(DecodeError):
        decode_from_worker(b"\xc1garbage")


def test_a_log_level_the_workers_do_not_know_is_undecodable():
    for level in ("verbose", "DEBUG", ""):
        with pytest.raises(DecodeError, match="level"):
            decode_to_worker(encode(SetLogLevel(level)))
