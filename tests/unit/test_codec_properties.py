"""Property tests of the worker socket's msgpack codec (hypothesis): every message round
trips; any bytes decode to a message or a DecodeError, nothing else; whatever the HTTP door
lets through encodes."""
from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraxd.http.conform import conform
from loraxd.http.errors import ApiError
from loraxd.http.request_types import Parameters
from loraxd.http.schemas import Limits, parse_parameters
from loraxd.protocol import worker
from loraxd.protocol.codec import DecodeError, decode_from_worker, decode_to_worker, encode

PROPERTIES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack carries
_FLOAT = st.floats(allow_nan=False)  # NaN != NaN: round trips, but never compares equal


def strategy(info: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec type, from its msgspec.inspect description."""
    mi = msgspec.inspect
    if isinstance(info, mi.IntType):
        lo = -(2**63) if info.ge is None else info.ge
        return st.integers(min_value=lo, max_value=2**64 - 1 if lo >= 0 else 2**63 - 1)
    simple = {mi.FloatType: _FLOAT, mi.BoolType: st.booleans(), mi.StrType: st.text(),
              mi.BytesType: st.binary(), mi.NoneType: st.none(), mi.AnyType: st.none()}
    if type(info) in simple:
        return simple[type(info)]
    if isinstance(info, (mi.ListType, mi.VarTupleType)):
        items = st.lists(strategy(info.item_type), max_size=4)
        return items if isinstance(info, mi.ListType) else items.map(tuple)
    if isinstance(info, mi.DictType):
        return st.dictionaries(strategy(info.key_type), strategy(info.value_type), max_size=3)
    if isinstance(info, mi.UnionType):
        return st.one_of([strategy(t) for t in info.types])
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.StructType):
        fields = {f.name: strategy(f.type) for f in info.fields}
        return st.fixed_dictionaries(fields).map(lambda kw: info.cls(**kw))
    raise NotImplementedError(info)


def messages(union: Any) -> st.SearchStrategy[Any]:
    return strategy(msgspec.inspect.type_info(union))


@PROPERTIES
@given(messages(worker.ToWorker))
def test_every_message_to_a_worker_round_trips(msg):
    assert decode_to_worker(encode(msg)) == msg


@PROPERTIES
@given(messages(worker.FromWorker))
def test_every_message_from_a_worker_round_trips(msg):
    assert decode_from_worker(encode(msg)) == msg


@PROPERTIES
@given(st.binary(max_size=256))
def test_any_bytes_decode_to_a_message_or_a_decode_error(frame):
    for decode in (decode_to_worker, decode_from_worker):
        try:
            decode(frame)
        except DecodeError:
            pass


@PROPERTIES
@given(messages(worker.ToWorker), st.data())
def test_a_damaged_frame_is_a_decode_error_or_a_message(msg, data):
    frame = bytearray(encode(msg))
    at = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    frame[at] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(frame)))
    try:
        decode_to_worker(bytes(frame[:cut]))
    except DecodeError:
        pass


LIMITS = Limits(max_best_of=4, max_stop_sequences=4, max_input_length=64, max_total_tokens=128,
                default_adapter_source="hub")
_ANY_NUMBER = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True))
_PARAMETERS = st.fixed_dictionaries({}, optional={
    name: _ANY_NUMBER for name in ("temperature", "top_k", "top_p", "typical_p",
                                   "repetition_penalty", "frequency_penalty",
                                   "presence_penalty", "seed", "return_k_alternatives",
                                   "max_new_tokens", "truncate", "best_of")
} | {"do_sample": st.booleans()})


@PROPERTIES
@given(_PARAMETERS)
def test_what_the_door_lets_through_encodes_and_stays_finite(raw):
    """Integers that pass the door fit msgpack; floats that pass are finite."""
    try:
        params = parse_parameters(raw, stream=False, limits=LIMITS)
        conform({"inputs": "x", "parameters": raw}, _Body)
    except ApiError as err:
        assert err.status == 422
        return
    sampling = params.sampling
    step = worker.Step(1, [worker.NewSeq(1, [1, 2], [0], sampling)], [], {}, [])
    assert decode_to_worker(encode(step)) == step
    for value in msgspec.structs.astuple(sampling):
        if isinstance(value, float):
            assert math.isfinite(value)
    if sampling.do_sample:
        assert sampling.temperature >= 1e-6


class _Body(msgspec.Struct):
    inputs: str
    parameters: Parameters | None = None


def test_the_encoder_refuses_what_msgpack_cannot_carry():
    """Why the door bounds integers: one past uint64 cannot be sent to a worker."""
    with pytest.raises(OverflowError):
        encode(worker.SamplingParams(top_k=2**64))
