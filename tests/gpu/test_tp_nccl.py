"""The NCCL path: 2 ranks on 2 GPUs give the tokens of 1 GPU, and each rank reports its own
device and memory. Skipped without CUDA (conftest.py) or with fewer than 2 GPUs."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.integration.worker_group import WorkerGroup  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model  # noqa: E402

pytestmark = pytest.mark.gpu


def _greedy(model_dir, world_size, tmp_path):
    group = WorkerGroup(model_dir, world_size, tmp_path, device="cuda")
    try:
        requests = [(1, [5, 9, 33, 100, 7], 0, 8), (2, [4, 4, 90], 1, 8)]
        outputs = Driver(group).run(requests)
        return {r: [o.token_id for o in outs] for r, outs in outputs.items()}, group.ready
    finally:
        group.close()


def test_two_gpus_give_the_tokens_of_one(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    build_tiny_model("llama-tied", tmp_path / "model")
    one, ready1 = _greedy(tmp_path / "model", 1, tmp_path / "one")
    two, ready2 = _greedy(tmp_path / "model", 2, tmp_path / "two")
    assert two == one
    assert [ready2[r].device for r in (0, 1)] == ["cuda:0", "cuda:1"]
    uuids = [ready2[r].device_uuid for r in (0, 1)]
    assert all(uuids) and uuids[0] != uuids[1]  # each rank on its own GPU
    assert ready2[1].weight_bytes * 2 == ready1[0].weight_bytes
