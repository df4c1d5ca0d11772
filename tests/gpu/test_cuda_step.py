"""On CUDA a step makes no host sync before it reads the sampled ids, eager or replayed
from CUDA graphs (torch's sync debug mode
turns any into an error), with the Triton kernels and two adapters in the batch; and the
CPU-side helpers that make it so. Skipped without CUDA (conftest.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker import runner as runner_module  # noqa: E402
from loraxd.worker.device_copy import SideStreamUploads, tensor_on  # noqa: E402
from loraxd.worker.runner import ModelRunner  # noqa: E402
from tests.unit.test_family_adapters import _save_adapter  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "graphs"])
def test_a_step_syncs_only_to_read_the_sampled_ids(tmp_path, monkeypatch, compile):
    base = build_tiny_model("llama-tied", tmp_path / "model")
    base = _save_adapter(base, tmp_path / "a", seed=1, rank=8)
    _save_adapter(base, tmp_path / "b", seed=2, rank=16)
    runner = ModelRunner(str(tmp_path / "model"), device="cuda", dtype="bfloat16",
                         block_size=16, max_batch_total_tokens=512, compile=compile)
    assert runner.kernels == "triton"
    runner.enable_lora(num_slots=2, max_rank=16)
    for slot, name in enumerate(("a", "b")):
        runner.install_adapter(slot, runner.read_adapter(str(tmp_path / name)))

    real_sample = runner_module.sample

    def sample_unchecked(*args):  # sampling ends the step: it reads the ids back
        torch.cuda.set_sync_debug_mode(0)
        return real_sample(*args)

    monkeypatch.setattr(runner_module, "sample", sample_unchecked)
    driver = Driver(runner)
    new = [(1, [5, 9, 33, 100, 7, 1, 2, 3, 4], SamplingParams(), 0),
           (2, [4, 4, 90], SamplingParams(), 1), (3, [8, 200], SamplingParams(), -1)]
    for step in range(4):
        torch.cuda.set_sync_debug_mode("error")
        try:
            outputs = driver.step(new, [] if step == 0 else [1, 2, 3])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        new = []
        assert sorted(o.req_id for o in outputs) == [1, 2, 3]
    if compile:  # the three decode steps, padded to 4
        assert runner.graphs.replayed == 3


def test_uploads_on_the_side_stream_arrive_before_the_next_read():
    uploads = SideStreamUploads("cuda")
    dst = torch.zeros(1 << 20, device="cuda")
    src = torch.arange(1 << 20, dtype=torch.float32)
    with uploads:
        uploads.copy(dst, src)
    uploads.ready()
    assert torch.equal(dst.cpu(), src)


def test_tensor_on_cuda_matches_torch_tensor():
    values = [3, 1, 4, 1, 5]
    assert torch.equal(tensor_on(values, "cuda").cpu(), torch.tensor(values))
