"""bfloat16 and int8-weight-only through the ModelRunner, with LoRA: greedy outputs close to
float32's (PEFT's), the adapters' deltas applied on the quantized base, and a mixed batch
(base + 2 adapters) giving each sequence the tokens it gets alone. A CPU without bf16
instructions refuses both at start."""
from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.layers import quantized  # noqa: E402
from loraxd.worker.layers.quantized import GEMV_ROWS, Int8WeightOnlyKernel  # noqa: E402
from loraxd.worker.runner import ModelRunner, UnsupportedModel  # noqa: E402
from tests.unit.test_family_adapters import _reference, _save_adapter  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model  # noqa: E402

NEW_TOKENS = 10
TOP = 3
INT8 = "int8-weight-only"
MODES = [("bfloat16", None), ("float32", INT8), ("bfloat16", INT8)]
# How far each mode's top logprobs may sit from float32's (PEFT's) in the first LEADING
# steps, whose greedy tokens must be float32's (the tiny model has near ties later on).
TOLERANCE, LEADING = 0.2, 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    base = build_tiny_model("llama-tied", root / "model")
    base = _save_adapter(base, root / "a", seed=1, rank=8)
    base = _save_adapter(base, root / "b", seed=2, rank=4)
    rng = random.Random(5)
    prompts = {name: [rng.randrange(256) for _ in range(n)]
               for name, n in (("base", 7), ("a", 11), ("b", 4))}
    expected = {"base": _reference(base, prompts["base"])}
    with torch.inference_mode():
        peft_model = peft.PeftModel.from_pretrained(base, root / "a", adapter_name="a")
        peft_model.load_adapter(root / "b", adapter_name="b")
        for name in ("a", "b"):
            peft_model.set_adapter(name)
            expected[name] = _reference(peft_model, prompts[name])
    return root, prompts, expected


def _runner(root, dtype, quantize):
    runner = ModelRunner(str(root / "model"), dtype=dtype, quantize=quantize, block_size=4,
                         max_batch_total_tokens=512, num_threads=2)
    runner.enable_lora(num_slots=2)
    for slot, name in enumerate(("a", "b")):
        runner.install_adapter(slot, runner.read_adapter(str(root / name)))
    return runner


@pytest.fixture(scope="module", params=MODES, ids=lambda m: "+".join(filter(None, m)))
def mode(request, model):
    return request.param, _runner(model[0], *request.param)


SLOTS = {"base": -1, "a": 0, "b": 1}


def _alone(runner, prompts, name):
    got = Driver(runner).run([(1, prompts[name], 0, NEW_TOKENS)],
                             SamplingParams(num_alternatives=TOP), slots={1: SLOTS[name]})
    return got[1]


def _top(outputs) -> list[float]:
    return [lp for o in outputs for lp in o.top_logprobs]


def test_ready_info_and_weights_say_what_was_built(model, mode):
    (dtype, quantize), runner = mode
    info = runner.ready_info()
    assert info["dtype"] == dtype and info["quantize"] == quantize
    kernels = [linear.kernel for layer in runner.model.layers for linear in layer.linears()]
    assert all(isinstance(k, Int8WeightOnlyKernel) == (quantize is not None) for k in kernels)
    dense = ModelRunner(str(model[0] / "model"), block_size=4, max_batch_total_tokens=64,
                        num_threads=2)
    layer_bytes = [sum(lin.kernel.num_bytes for layer in r.model.layers
                       for lin in layer.linears()) for r in (dense, runner)]
    share = 0.25 if quantize else 0.5  # of float32's: int8 (+ scales), or bf16
    assert layer_bytes[1] <= layer_bytes[0] * share * 1.05
    assert info["weight_bytes"] < dense.ready_info()["weight_bytes"]


def test_greedy_outputs_stay_close_to_float32(model, mode):
    _, prompts, expected = model
    _, runner = mode
    tolerance, leading = TOLERANCE, LEADING
    for name in ("base", "a", "b"):
        outputs = _alone(runner, prompts, name)
        tokens, top = expected[name]
        assert [o.token_id for o in outputs][:leading] == tokens[:leading], name
        assert _top(outputs)[:leading * TOP] == pytest.approx(top[:leading * TOP],
                                                              abs=tolerance), name


def test_lora_deltas_apply_on_the_lower_precision_base(model, mode):
    """Each adapter's top logprobs are PEFT's (within the mode's tolerance), and much closer
    to them than the base model's on the same prompt: the delta is there, not lost."""
    _, prompts, expected = model
    _, runner = mode
    n = LEADING * TOP
    for name in ("a", "b"):
        reference = expected[name][1][:n]
        with_adapter = _top(_alone(runner, prompts, name))[:n]
        without = _top(Driver(runner).run([(2, prompts[name], 0, NEW_TOKENS)],
                                          SamplingParams(num_alternatives=TOP))[2])[:n]
        off = max(abs(a - b) for a, b in zip(with_adapter, reference))
        base_off = max(abs(a - b) for a, b in zip(without, reference))
        assert off < TOLERANCE and base_off > 2 * off, (name, off, base_off)


def test_a_mixed_batch_gives_each_sequence_its_tokens_alone(model, mode):
    """The batch's first prefill (base + a) has more rows than the int8 kernel takes, each
    prompt alone fewer: both int8 paths are compared."""
    _, runner = mode
    rng = random.Random(9)
    prompts = {name: [rng.randrange(256) for _ in range(n)]
               for name, n in (("base", 20), ("a", 15), ("b", 4))}
    assert len(prompts["base"]) <= GEMV_ROWS < len(prompts["base"]) + len(prompts["a"])
    alone = {name: _alone(runner, prompts, name) for name in SLOTS}
    requests = [(10, prompts["base"], 0, NEW_TOKENS), (11, prompts["a"], 0, NEW_TOKENS),
                (12, prompts["b"], 2, NEW_TOKENS)]
    got = Driver(runner, seed=4).run(requests, SamplingParams(num_alternatives=TOP),
                                     slots={11: 0, 12: 1})
    for req_id, name in ((10, "base"), (11, "a"), (12, "b")):
        assert [o.token_id for o in got[req_id]] == [o.token_id for o in alone[name]], name
        # fp32 activations, or bf16 on AMX (one kernel for every row count): exactly equal;
        # bf16 on oneDNN, whose kernels change with the row count, within bf16's rounding
        exact = "bfloat16" not in mode[0] or cpu_kernels.amx_usable()
        tolerance = 0 if exact else 0.1
        assert _top(got[req_id]) == pytest.approx(_top(alone[name]), abs=tolerance), name


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", None), ("float32", INT8)])
def test_a_cpu_without_bf16_refuses_both_at_start(model, monkeypatch, dtype, quantize):
    monkeypatch.setattr(quantized, "cpu_flags", lambda: {"fpu", "avx2", "avx512f"})
    monkeypatch.setattr(quantized.platform, "machine", lambda: "x86_64")
    with pytest.raises(UnsupportedModel, match=r"on this CPU: this CPU has neither "
                       r"AVX512_BF16 nor AMX-BF16.*; use --dtype float32 without --quantize$"):
        ModelRunner(str(model[0] / "model"), dtype=dtype, quantize=quantize,
                    max_batch_total_tokens=64)
    ModelRunner(str(model[0] / "model"), max_batch_total_tokens=64)  # float32 still starts
