"""The worker's start-up options: one typed message with every field named by the
supervisor from the config tree, decoded strictly by the worker."""
import dataclasses

import msgspec
import pytest

from loraxd.config.tree import Config
from loraxd.daemon.supervisor import Supervisor
from loraxd.protocol.codec import decode_options
from loraxd.protocol.worker import WorkerOptions


def _config(**model):
    config = Config()
    adapters = dataclasses.replace(config.adapters, max_lora_rank=8, max_adapter_bytes=1234)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model),
                               adapters=adapters)


def test_options_carry_the_config():
    options = decode_options(Supervisor(_config(), "/m", workers=None)._options())
    assert options.max_lora_rank == 8 and options.max_adapter_bytes == 1234
    assert options.block_size == Config().scheduler.block_size
    assert options.master_port == 0  # one rank: no group, no port
    assert options.quantize is None and options.dtype == "float32"
    quantized = decode_options(Supervisor(_config(quantize="int8-weight-only",
                                                  dtype="bfloat16"), "/m", None)._options())
    assert quantized.quantize == "int8-weight-only" and quantized.dtype == "bfloat16"


def test_a_group_gets_a_free_port_unless_one_is_set():
    picked = decode_options(Supervisor(_config(num_shard=2), "/m", None)._options())
    assert picked.master_port > 0
    fixed = decode_options(Supervisor(_config(num_shard=2, master_port=29500), "/m",
                                      None)._options())
    assert fixed.master_port == 29500


def test_no_field_may_be_missing_or_unknown():
    text = Supervisor(_config(), "/m", None)._options()
    fields = msgspec.json.decode(text)
    assert set(fields) == set(WorkerOptions.__struct_fields__)
    del fields["max_lora_rank"]
    with pytest.raises(msgspec.ValidationError, match="max_lora_rank"):
        decode_options(msgspec.json.encode(fields).decode())
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        decode_options(msgspec.json.encode({**msgspec.json.decode(text),
                                            "surprise": 1}).decode())
