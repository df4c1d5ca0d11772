"""`compile`: decode steps served from fixed, padded buffers (decode_graphs.py) give the eager
steps' tokens, in a continuous batch of two adapters and the base model whose decode batches
cross the capture sizes (padded, exact, and too big for any: eager). On the CPU the Triton
kernels run in the interpreter and a "replay" is the eager forward pass over the buffers; on
CUDA the graphs are captured and replayed."""
from __future__ import annotations

import pytest

from tests.unit.triton_env import DEVICES, SKIP_NO_TRITON

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker.decode_graphs import DecodeGraphs  # noqa: E402
from loraxd.worker.models import UnsupportedModel  # noqa: E402
from loraxd.worker.runner import ModelRunner  # noqa: E402

peft = pytest.importorskip("peft")
from tests.unit.test_family_adapters import _save_adapter  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model  # noqa: E402

pytestmark = SKIP_NO_TRITON

# (req_id, prompt, join step, tokens): decode-only batches of 2, 3 (padded to 4), 5 and 6
# (eager: no graph), 4 and 1, between steps that prefill (eager)
REQUESTS = [(1, [5, 9, 33, 100, 7, 1, 2, 3, 4], 0, 12), (2, [4, 4, 90], 0, 10),
            (3, [17] * 13, 3, 8), (4, [8, 200], 6, 8), (5, [1, 2, 3], 6, 6),
            (6, [9, 8, 7, 6, 5], 8, 4)]
SLOTS = {1: 0, 3: 0, 4: 1, 6: 1}  # 2 and 5: the base model
SIZES = (1, 2, 4)  # batches of 3 padded to 4; 5 and 6 have no graph


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    base = build_tiny_model("qwen3-sliding-bias", root / "model")
    base = _save_adapter(base, root / "a", seed=1, rank=8)
    _save_adapter(base, root / "b", seed=2, rank=16)
    return root


def _run(root, device: str, compile: bool):
    runner = ModelRunner(str(root / "model"), device=device, block_size=4,
                         max_batch_total_tokens=256, num_threads=2, kernels="triton",
                         compile=compile)
    if compile:
        runner.graphs = DecodeGraphs(runner, SIZES)
    runner.enable_lora(num_slots=2, max_rank=16)  # captured again, with the pool
    for slot, name in enumerate(("a", "b")):  # after the capture: tables refilled in place
        runner.install_adapter(slot, runner.read_adapter(str(root / name)))
    outputs = Driver(runner).run(REQUESTS, SamplingParams(num_alternatives=3), slots=SLOTS)
    tokens = {r: [o.token_id for o in outs] for r, outs in outputs.items()}
    logprobs = {r: [lp for o in outs for lp in (o.logprob, *o.top_logprobs)]
                for r, outs in outputs.items()}
    return runner, tokens, logprobs


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_decode_steps_give_the_eager_tokens(model_dir, device):
    runner, tokens, logprobs = _run(model_dir, device, compile=True)
    _, expected_tokens, expected_logprobs = _run(model_dir, device, compile=False)
    assert tokens == expected_tokens
    for req_id, values in expected_logprobs.items():
        assert logprobs[req_id] == pytest.approx(values, abs=1e-3), req_id
    assert runner.graphs.replayed >= 5
    null = runner.kv_cache.null_block * runner.block_size
    page = runner.kv_cache.data[:, null:null + runner.block_size]
    assert not page.any(), "the padding rows' K/V were left in the null page"


def test_sizes_and_what_runs_eagerly(model_dir):
    runner = ModelRunner(str(model_dir / "model"), block_size=4, max_batch_total_tokens=256,
                         num_threads=2, kernels="triton", compile=True)
    graphs = runner.graphs
    assert graphs.sizes[-1] == 128 and graphs.max_positions == 256

    class Seq:
        def __init__(self, num_cached):
            self.num_cached = num_cached

    assert [graphs.size_for([Seq(3)] * n) for n in (1, 3, 9, 100, 128)] == [1, 4, 16, 128, 128]
    assert graphs.size_for([Seq(3)] * 129) is None
    assert graphs.size_for([Seq(255)]) == 1
    assert graphs.size_for([Seq(256)]) is None  # past every page the cache holds


def test_compile_is_refused_where_it_cannot_run(model_dir):
    with pytest.raises(UnsupportedModel, match="compile: CUDA graphs need the Triton kernels"):
        ModelRunner(str(model_dir / "model"), block_size=4, max_batch_total_tokens=256,
                    kernels="torch", compile=True)


def test_compile_needs_cuda_outside_the_interpreter(model_dir, monkeypatch):
    from loraxd.worker import triton_support
    monkeypatch.setattr(triton_support, "interpreting", lambda: False)
    with pytest.raises(UnsupportedModel, match="compile: CUDA graphs of the decode step need "
                       "device = cuda"):
        ModelRunner(str(model_dir / "model"), block_size=4, max_batch_total_tokens=256,
                    compile=True)
