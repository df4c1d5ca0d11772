"""How a rank sizes its KV cache on CUDA, run on the CPU with torch.cuda's memory calls
faked: the budget within cuda_memory_fraction, the smallest fit of the group, a requested
cache refused when it does not fit, a replaced group held to its pages; and on a real
2-rank gloo group, that every rank gets the smallest of the ranks' numbers."""
from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loraxd.worker import kv_plan, kv_sizing  # noqa: E402
from loraxd.worker.distributed import init_tensor_parallel  # noqa: E402
from loraxd.worker.kv_cache import PagedKVCache  # noqa: E402
from loraxd.worker.kv_sizing import KvCacheTooLarge  # noqa: E402
from loraxd.worker.runner import KvSizing, ModelRunner  # noqa: E402
from tests.unit.test_model_fidelity import build_tiny_model  # noqa: E402

GIB = 1 << 30


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("llama")
    build_tiny_model("llama-untied-llama3-rope", out_dir)
    return ModelRunner(str(out_dir), block_size=16, max_batch_total_tokens=64, num_threads=1)


class PeerTP:
    """This rank, plus one peer whose fit is `peer_fit`."""

    def __init__(self, tp, peer_fit: int):
        self.rank, self.peer_fit, self.seen = 0, peer_fit, []

    def min_over_ranks(self, value: int) -> int:
        self.seen.append(value)
        return min(value, self.peer_fit)


@pytest.fixture
def on_cuda(runner, monkeypatch):
    """The runner as if on a GPU with 80 GiB, `free` of it free (a list: set it)."""
    free = [60 * GIB]
    calls = []
    monkeypatch.setattr(runner, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: calls.append("mem_get_info") or (free[0], 80 * GIB))
    return free, calls


def pages(runner, tokens, kv) -> int:
    return kv_plan.kv_blocks(runner, tokens, kv)[0]


def page_bytes(runner) -> int:
    arch = runner.arch
    page = PagedKVCache.page_bytes(arch.num_layers, 16, runner.model.shard.num_kv_heads,
                                   arch.head_dim, runner.dtype)
    return page + -(-page // arch.num_layers)  # the torch kernels' decode buffer


def test_unset_takes_what_fits_in_the_share_after_the_headroom(runner, on_cuda):
    free, calls = on_cuda
    blocks, note = kv_plan.kv_blocks(runner, None,
                                     KvSizing(memory_fraction=0.9, max_prefill_tokens=512))
    headroom = kv_sizing.activation_headroom_bytes(kv_plan.step_widths(runner), 512)
    budget = 60 * GIB - 8 * GIB - headroom
    assert blocks == budget // page_bytes(runner) - 1
    assert calls == ["sync", "empty_cache", "mem_get_info"]  # freed blocks back first
    assert kv_plan.step_widths(runner).score_heads == runner.model.shard.num_heads  # torch path
    assert "cuda_memory_fraction 0.9" in note


def test_the_group_takes_the_smallest_fit(runner, on_cuda, monkeypatch):
    monkeypatch.setattr(runner, "tp", PeerTP(runner.tp, peer_fit=1000))
    assert pages(runner, None, KvSizing()) == 999
    assert runner.tp.seen[0] > 1000  # this rank fit more, and took the peer's


def test_a_requested_cache_must_fit_and_a_replaced_group_keeps_its_pages(runner, on_cuda):
    free, _ = on_cuda
    assert pages(runner, 64, KvSizing()) == 64 // 16 + 4  # max_batch_total_tokens wins
    free[0] = 8 * GIB
    with pytest.raises(KvCacheTooLarge, match=r"the KV cache of 8 pages needs .* but 0.0 MiB "
                                              r"fit \(8.00 GiB of 80.00 GiB free on rank 0 .* "
                                              r"cuda_memory_fraction 0.9"):
        pages(runner, 64, KvSizing(memory_fraction=0.9))  # 8 GiB left for others: none
    with pytest.raises(RuntimeError, match="the replaced workers must hold the 5000 KV pages"):
        pages(runner, None, KvSizing(memory_fraction=0.9, num_blocks=5000))
    free[0] = 60 * GIB
    assert pages(runner, None, KvSizing(num_blocks=5000)) == 5000


def test_a_cpu_takes_the_requested_pages_and_no_share(runner):
    assert pages(runner, 64, KvSizing()) == 8
    with pytest.raises(ValueError, match="cuda_memory_fraction means nothing on a CPU"):
        pages(runner, 64, KvSizing(memory_fraction=0.5))
    with pytest.raises(ValueError, match="sized by max_batch_total_tokens"):
        pages(runner, None, KvSizing())


def test_lora_slots_are_allocated_before_the_cache_is_sized(runner, monkeypatch, tmp_path):
    order = []
    monkeypatch.setattr(ModelRunner, "enable_lora",
                        lambda self, n, max_rank=64: order.append(("lora", n, max_rank)))
    real = kv_plan.kv_blocks
    monkeypatch.setattr(kv_plan, "kv_blocks", lambda *a: order.append("kv") or real(*a))
    ModelRunner(runner.model_dir, block_size=16, max_batch_total_tokens=64, num_threads=1,
                lora_slots=3, max_lora_rank=8)
    assert order == [("lora", 3, 8), "kv"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, values, out) -> None:
    tp = init_tensor_parallel(rank, 2, torch.device("cpu"), master_addr="127.0.0.1",
                              master_port=port, timeout_s=60.0)
    try:
        out.put((rank, tp.min_over_ranks(values[rank])))
    finally:
        tp.close()


def test_min_over_ranks_on_a_gloo_group():
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, [7000, 6500], out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    assert got == {0: 6500, 1: 6500}
