"""The whole model on the Triton kernels (attention and LoRA) gives the torch path's greedy
tokens and logprobs, in one continuous batch of prompts and decodes for two adapters and the
base model; and which kernels a runner picks. The kernels run in Triton's interpreter on
the CPU, compiled on CUDA where there is one."""
from __future__ import annotations

import pytest

from tests.unit.triton_env import DEVICES, SKIP_NO_TRITON

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker.runner import ModelRunner  # noqa: E402
from loraxd.worker.triton_support import triton_installed, use_triton  # noqa: E402

peft = pytest.importorskip("peft")
from tests.unit.test_family_adapters import _save_adapter  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model  # noqa: E402

# softcap + sliding window + head_dim 16; a head size of 24 (not a power of two) + q/k norms
FAMILIES = ["gemma2", "qwen3-sliding-bias"]
REQUESTS = [(1, [5, 9, 33, 100, 7, 1, 2, 3, 4], 0, 6), (2, [4, 4, 90], 0, 6),
            (3, [17] * 13, 2, 4), (4, [8, 200], 3, 4)]  # (req_id, prompt, join step, tokens)
SLOTS = {1: 0, 3: 0, 4: 1}  # request 2: the base model


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_model(request.param, root / "model")
    base = _save_adapter(base, root / "a", seed=1, rank=8)
    _save_adapter(base, root / "b", seed=2, rank=16)
    return root


def _run(root, device: str, kernels: str):
    runner = ModelRunner(str(root / "model"), device=device, block_size=4,
                         max_batch_total_tokens=256, num_threads=2, kernels=kernels)
    assert runner.kernels == kernels
    runner.enable_lora(num_slots=2, max_rank=16)
    for slot, name in enumerate(("a", "b")):
        runner.install_adapter(slot, runner.read_adapter(str(root / name)))
    outputs = Driver(runner).run(REQUESTS, SamplingParams(num_alternatives=3), slots=SLOTS)
    return ({r: [o.token_id for o in outs] for r, outs in outputs.items()},
            {r: [lp for o in outs for lp in (o.logprob, *o.top_logprobs)]
             for r, outs in outputs.items()})


@SKIP_NO_TRITON
@pytest.mark.parametrize("device", DEVICES)
def test_triton_kernels_give_the_torch_tokens(model_dir, device):
    tokens, logprobs = _run(model_dir, device, "triton")
    expected_tokens, expected_logprobs = _run(model_dir, device, "torch")
    assert tokens == expected_tokens
    for req_id, values in expected_logprobs.items():
        assert logprobs[req_id] == pytest.approx(values, abs=1e-3), req_id


def test_kernel_choice():
    assert not use_triton("auto", "cpu")  # the CPU keeps its torch path
    assert not use_triton("torch", "cuda")
    assert use_triton("auto", "cuda") == triton_installed()
    with pytest.raises(ValueError, match="choose one of"):
        use_triton("cutlass", "cpu")
    if not triton_installed():
        with pytest.raises(ValueError, match="triton is not installed"):
            use_triton("triton", "cpu")
