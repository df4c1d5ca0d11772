"""Tensor parallelism with real worker processes over gloo: N ranks give the tokens one
rank gives, for the base model and a mixed batch of adapters (a merge among them); each
rank holds its share of the weights; a dead rank takes its group down instead of hanging.

Tiny random models (tests/unit/test_model_fidelity.py) whose logits have no near ties, so
the different float summation order of a sharded matmul cannot flip a greedy token; the
top logprobs are compared too (they show the adapters' effect, and any drift).
"""
from __future__ import annotations

import os
import random
import signal

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from loraxd.protocol.worker import (AdapterMerge, NewSeq, SamplingParams, Step,  # noqa: E402
                                    WorkerError)
from tests.integration.worker_group import WorkerGroup  # noqa: E402
from tests.unit.test_family_adapters import _save_adapter  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model  # noqa: E402

pytestmark = pytest.mark.integration

NEW_TOKENS = 8
TOP = 3
MERGE = AdapterMerge([], [0.6, 0.4], "ties", density=0.5)


@pytest.fixture(scope="module", params=["llama-tied", "gemma2", "phi3"])
def family(request, tmp_path_factory):
    """A tiny model and three PEFT adapters (ranks 8, 4, 2) on all its linears."""
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_model(request.param, root / "model")
    for name, seed, rank in (("a", 1, 8), ("b", 2, 4), ("c", 3, 2)):
        base = _save_adapter(base, root / name, seed=seed, rank=rank)
    return request.param, root


def _run_group(root, world_size, tmp_path, **options):
    """Greedy outputs of a mixed batch (base, a, b, c, merge of a and b) joining at
    different steps; and each rank's Ready."""
    group = WorkerGroup(root / "model", world_size, tmp_path, **options)
    try:
        for slot, name in enumerate("abc"):
            assert group.load_adapter(slot, str(root / name)) == dict.fromkeys(
                range(world_size))
        merge = AdapterMerge([str(root / "a"), str(root / "b")], MERGE.weights,
                             MERGE.strategy, MERGE.density)
        assert group.load_adapter(3, merge=merge) == dict.fromkeys(range(world_size))
        rng = random.Random(5)
        requests = [(i, [rng.randrange(256) for _ in range(n)], join, NEW_TOKENS)
                    for i, (n, join) in enumerate(((7, 0), (11, 0), (4, 1), (9, 2), (5, 2)))]
        slots = {1: 0, 2: 1, 3: 2, 4: 3}
        outputs = Driver(group, seed=3).run(requests, SamplingParams(num_alternatives=TOP),
                                            slots=slots)
        return outputs, dict(group.ready)
    finally:
        group.close()


@pytest.fixture(scope="module")
def single(family, tmp_path_factory):
    return _run_group(family[1], 1, tmp_path_factory.mktemp("tp1"))


def _tokens(outputs):
    return {req_id: [o.token_id for o in outs] for req_id, outs in outputs.items()}


def _tops(outputs):
    return {req_id: [lp for o in outs for lp in o.top_logprobs] for req_id, outs in outputs.items()}


def test_two_ranks_give_the_tokens_of_one(family, single, tmp_path):
    name, root = family
    expected, ready1 = single
    got, ready2 = _run_group(root, 2, tmp_path)
    assert _tokens(got) == _tokens(expected), name
    for req_id, tops in _tops(got).items():
        assert tops == pytest.approx(_tops(expected)[req_id], abs=1e-4), (name, req_id)
    whole, halves = ready1[0].weight_bytes, [ready2[r].weight_bytes for r in (0, 1)]
    print(f"\n{name}: weight bytes, 1 rank {whole}; 2 ranks {halves} "
          f"({halves[0] / whole:.3f} of one); KV cache {ready1[0].kv_cache_bytes} -> "
          f"{ready2[0].kv_cache_bytes}")
    assert all(0.45 * whole <= h <= 0.55 * whole for h in halves)
    assert ready2[0].kv_cache_bytes * 2 == ready2[1].kv_cache_bytes * 2 == \
        ready1[0].kv_cache_bytes
    assert ready2[0].num_blocks == ready2[1].num_blocks == ready1[0].num_blocks


def test_two_ranks_quantize_their_own_shards(family, request, tmp_path):
    """int8-weight-only over 2 ranks: each rank quantizes its own shard, with the whole rows'
    scales, so 2 ranks give the tokens of 1 int8 rank, near float32's; their logprobs differ
    only by the bf16 rounding of the kernel's partial sums (each rank's, before the
    all-reduce). Each rank holds half the int8 weights."""
    name, root = family
    if name != "llama-tied":
        pytest.skip("one family is enough for quantized shards")
    expected, dense = request.getfixturevalue("single")
    runs = []
    for world_size in (1, 2):
        (tmp_path / str(world_size)).mkdir()
        runs.append(_run_group(root, world_size, tmp_path / str(world_size),
                               quantize="int8-weight-only"))
    (one, ready1), (two, ready2) = runs
    assert ready1[0].quantize == ready2[0].quantize == ready2[1].quantize == "int8-weight-only"
    assert ready1[0].weight_bytes < dense[0].weight_bytes
    halves = [ready2[r].weight_bytes for r in (0, 1)]
    assert all(0.45 * ready1[0].weight_bytes <= h <= 0.55 * ready1[0].weight_bytes
               for h in halves)
    for req_id in expected:
        for got in (one, two):
            tokens = [o.token_id for o in got[req_id]]
            assert tokens[:3] == _tokens(expected)[req_id][:3], req_id
            assert _tops(got)[req_id][:3 * TOP] == pytest.approx(
                _tops(expected)[req_id][:3 * TOP], abs=0.2), req_id
    assert _tokens(two) == _tokens(one)
    for req_id, tops in _tops(two).items():
        assert tops == pytest.approx(_tops(one)[req_id], abs=0.05), req_id


def test_four_ranks_replicate_two_kv_heads(family, single, tmp_path):
    name, root = family
    if name != "llama-tied":  # 2 KV heads over 4 ranks: each held by two of them
        pytest.skip("one family is enough for KV replication")
    got, ready4 = _run_group(root, 4, tmp_path)
    expected, ready1 = single
    assert _tokens(got) == _tokens(expected)
    assert ready4[3].kv_cache_bytes * 2 == ready1[0].kv_cache_bytes  # 1 of 2 KV heads each


def test_a_dead_rank_takes_its_group_down(family, tmp_path):
    """kill -9 of rank 1: rank 0, sent the next step, fails its collective and exits with
    a WorkerError instead of waiting for ever."""
    if family[0] != "llama-tied":
        pytest.skip("one family is enough")
    group = WorkerGroup(family[1] / "model", 2, tmp_path)
    try:
        driver = Driver(group)
        assert len(driver.step([(1, [5, 6, 7], SamplingParams(), -1)])) == 1
        os.kill(group.procs[1].pid, signal.SIGKILL)
        group.procs[1].wait(10)
        step = Step(driver.step_id, new_seqs=[NewSeq(2, [1, 2, 3], [driver.free.pop()],
                                                     SamplingParams())])
        msg = group.expect_failure(step)
        assert isinstance(msg, WorkerError) and "rank 0" in msg.message, msg
        assert group.procs[0].wait(30) == 1
    finally:
        group.close()
