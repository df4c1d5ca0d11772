"""How a model and its adapters split over tensor-parallel ranks, checked without processes:
each rank's part computed alone, then concatenated (column-parallel) or summed (row-parallel,
what the all-reduce does) must give the whole layer's output."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from loraxd.worker.distributed import ShardSpec  # noqa: E402
from loraxd.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding  # noqa: E402
from loraxd.worker.layers.linear import ColumnParallelLinear  # noqa: E402
from loraxd.worker.lora import LoraAdapter, LoraSlotPool  # noqa: E402
from loraxd.worker.lora.merge import merge_adapters  # noqa: E402
from loraxd.worker.lora.storage import GROUP_MODULES  # noqa: E402
from loraxd.worker.lora.sharding import shard_adapter  # noqa: E402
from loraxd.worker.models.arch import read_arch  # noqa: E402
from loraxd.worker.models.hf_config import UnsupportedModel  # noqa: E402
from loraxd.worker.models.sharding import shard_model  # noqa: E402

TINY = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
LAYERS = 2


def arch(**extra):
    return read_arch(transformers.LlamaConfig(**{**TINY, **extra}))


def shards(world_size: int, model=None):
    model = model or arch()
    return [shard_model(model, ShardSpec(rank, world_size)) for rank in range(world_size)]


# -- what a model may be split into ------------------------------------------------------------


@pytest.mark.parametrize("extra, world_size, named", [
    (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6), 4,
     "6 attention heads do not split over 4 ranks"),
    (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2,
     r"3 KV heads do not split over 2 ranks \(num_shard\), nor does 2 split into copies"),
    (dict(intermediate_size=90), 4, "intermediate_size 90 does not split over 4 ranks"),
])
def test_counts_that_do_not_split_are_refused_by_name(extra, world_size, named):
    with pytest.raises(UnsupportedModel, match=named):
        shard_model(arch(**extra), ShardSpec(0, world_size))


def test_kv_heads_fewer_than_ranks_are_replicated():
    """2 KV heads over 4 ranks: ranks 0, 1 hold KV head 0 (read by q heads 0, 1), 2, 3 head 1."""
    parts = [s.lora_parts()["k_proj"][1] for s in shards(4)]
    assert parts == [slice(0, 16), slice(0, 16), slice(16, 32), slice(16, 32)]
    assert [s.num_kv_heads for s in shards(4)] == [1] * 4
    assert [s.num_heads for s in shards(4)] == [1] * 4
    assert shards(2)[1].num_kv_heads == 1 and shards(2)[1].kv_replicas == 1


def test_shard_module_shapes_halve_the_split_side():
    assert shards(2)[0].module_shapes() == {
        "q_proj": (64, 32), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (32, 64),
        "gate_proj": (64, 48), "up_proj": (64, 48), "down_proj": (48, 64)}


# -- base weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_qkv_shards_give_each_rank_its_heads(world_size):
    h, q, kv = 64, 64, 32
    full = [torch.randn(size, h) for size in (q, kv, kv)]
    x = torch.randn(3, h)
    for shard in shards(world_size):
        layer = ColumnParallelLinear(h, [q, kv, kv], rank=shard.shard.rank,
                                     world_size=world_size,
                                     replicas=[1, shard.kv_replicas, shard.kv_replicas])
        for i, w in enumerate(full):
            layer.load_weight(w, i)
        layer.finalize()
        got = layer.forward(x).split(layer.output_sizes, -1)
        for module, part, w in zip(("q_proj", "k_proj", "v_proj"), got, full):
            rows = shard.lora_parts()[module][1]
            assert torch.allclose(part, x @ w[rows].T, atol=1e-5), module


class FakeGroup:
    """Stands in for TensorParallel: `all_reduce` records the partial, the test sums them."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.partial = None

    def all_reduce(self, x):
        self.partial = x.clone()
        return x

    def gather_last_dim(self, x):
        self.partial = x.clone()
        return None if self.rank else x


class FakeTP(FakeGroup):
    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.shard = ShardSpec(rank, world_size)


@pytest.mark.parametrize("vocab", [50, 51])  # 51: the last rank's block is padded
def test_vocab_parallel_embedding_and_lm_head(vocab):
    table, ids = torch.randn(vocab, 8), torch.tensor([0, 24, 25, vocab - 1, 3])
    hidden = torch.randn(4, 8)
    embedded, logits = [], []
    for rank in range(2):
        group = FakeGroup(rank, 2)
        emb = VocabParallelEmbedding(vocab, 8, group, dtype=torch.float32, device="cpu")
        emb.load(table)
        emb.forward(ids)
        embedded.append(group.partial)
        ParallelLMHead(emb.weight, vocab, group)(hidden)
        logits.append(group.partial)
    assert torch.equal(embedded[0] + embedded[1], table[ids])  # each row on one rank: exact
    full = torch.cat(logits, -1)[:, :vocab]
    assert torch.allclose(full, hidden @ table.T, atol=1e-5)


def test_weights_each_rank_loads_are_its_share(tmp_path):
    from tests.unit.test_model_fidelity import build_tiny_model
    from loraxd.worker import loader
    from loraxd.worker.models import CausalLM, resolve

    build_tiny_model("llama-untied-llama3-rope", tmp_path)
    model_arch = resolve(tmp_path)
    sizes = []
    for world_size, rank in ((1, 0), (2, 0), (2, 1)):
        model = CausalLM(model_arch, dtype=torch.float32, device="cpu",
                         tp=FakeTP(rank, world_size))
        model.load_weights(loader.iter_weights(tmp_path))
        sizes.append(model.weight_bytes())
    assert sizes[1] == sizes[2] and sizes[1] * 2 == sizes[0]  # no biases: exactly half


def _weights(model) -> list[torch.Tensor]:
    """The rank's tables and norms, and each kernel's output for one fixed input (a packed
    oneDNN weight cannot be compared itself)."""
    kernels = [linear.kernel for layer in model.layers for linear in layer.linears()]
    kernels.append(model.lm_head.kernel)
    gen = torch.Generator().manual_seed(0)
    outputs = [k(torch.randn(3, k.in_features, generator=gen)) for k in kernels]
    biases = [linear.bias for layer in model.layers for linear in layer.linears()
              if linear.bias is not None]
    norms = [n.weight for layer in model.layers for n in layer.norms.values()]
    return outputs + biases + norms + [model.embed_tokens.weight, model.norm.weight]


@pytest.mark.parametrize("family", ["llama-untied-llama3-rope", "qwen2", "phi3"])
def test_a_rank_reads_only_its_slice_of_each_sharded_weight(tmp_path, family):
    """Each of 2 ranks reads from the file half of every column-, row- and vocab-parallel
    tensor and the whole of what both hold (norms, biases after a row-parallel sum), and ends
    with exactly the weights that slicing whole tensors gives (Phi-3: fused qkv and gate_up
    rows; Qwen2: q/k/v biases)."""
    from safetensors.torch import load_file

    from loraxd.worker import loader
    from loraxd.worker.models import CausalLM, resolve
    from tests.unit.test_model_fidelity import build_tiny_model

    build_tiny_model(family, tmp_path)
    model_arch = resolve(tmp_path)
    whole = {}
    for path in loader.safetensors_files(tmp_path):
        whole.update(load_file(path))
    replicated = sum(t.numel() * t.element_size() for name, t in whole.items()
                     if "norm" in name or name.endswith(("o_proj.bias", "down_proj.bias")))
    for rank in range(2):
        count = loader.ReadCount()
        lazy = CausalLM(model_arch, dtype=torch.float32, device="cpu", tp=FakeTP(rank, 2))
        lazy.load_weights(loader.iter_weights(tmp_path, count))
        eager = CausalLM(model_arch, dtype=torch.float32, device="cpu", tp=FakeTP(rank, 2))
        eager.load_weights(whole.items())
        assert all(torch.equal(a, b) for a, b in
                   zip(_weights(lazy), _weights(eager), strict=True))
        assert count.num_bytes == sum(t.numel() * t.element_size() for t in whole.values())
        assert count.bytes_read == (count.num_bytes - replicated) // 2 + replicated


# -- LoRA -----------------------------------------------------------------------------------


def random_adapter(model, rank: int, seed: int, modules=None) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in model.module_shapes().items():
            if modules is None or module in modules:
                weights[(layer, module)] = (torch.randn(rank, fan_in, generator=gen),
                                            torch.randn(fan_out, rank, generator=gen))
    return LoraAdapter(weights, {key: rank for key in weights}, 0)


def whole_delta(adapter, layer, module, x):
    a, b = adapter.weights[(layer, module)]
    return x @ a.T @ b.T


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("num_tokens", [6, 40])  # embedding bags; GEMMs
def test_sharded_lora_in_a_mixed_batch_equals_the_whole_adapters(world_size, num_tokens):
    """Three adapters (ranks 8, 4, and 2 on attention only) and the base model in one batch:
    column groups' rank outputs are the whole delta's columns, row groups' sum to it."""
    model = arch()
    adapters = [random_adapter(model, 8, 1), random_adapter(model, 4, 2),
                random_adapter(model, 2, 3, modules=GROUP_MODULES["qkv"] + ("o_proj",))]
    token_slots = torch.tensor([(t % 4) - 1 for t in range(num_tokens)])  # -1: base
    inputs = {"qkv": 64, "o": 64, "gate_up": 64, "down": 96}
    xs = {group: torch.randn(num_tokens, size) for group, size in inputs.items()}
    sums = {}
    for shard in shards(world_size, model):
        pool = LoraSlotPool(3, shard.module_shapes(), LAYERS, max_rank=8)
        for slot, adapter in enumerate(adapters):
            pool.load(slot, shard_adapter(adapter, shard.lora_parts(), world_size))
        step = pool.step_context(token_slots)
        parts = shard.lora_parts()
        for layer in range(LAYERS):
            for group, modules in GROUP_MODULES.items():
                side, cut = parts[modules[0]]
                x = xs[group] if side == "out" else xs[group][:, cut]
                spec = pool.storage.specs[group]
                y = torch.zeros(num_tokens, spec.out_features)
                step.apply(layer, group, x, y)
                for module, start, out in zip(spec.modules, spec.col_starts, spec.outs):
                    got = y[:, start:start + out]
                    want = expected_delta(adapters, token_slots, layer, module, xs[group])
                    if side == "out":
                        assert torch.allclose(got, want[:, parts[module][1]], atol=1e-3)
                    else:
                        sums[(layer, module)] = sums.get((layer, module), 0) + got
    for (layer, module), got in sums.items():
        want = expected_delta(adapters, token_slots, layer, module,
                              xs["o" if module == "o_proj" else "down"])
        assert torch.allclose(got, want, atol=1e-3), (layer, module)


def expected_delta(adapters, token_slots, layer, module, x):
    out = torch.zeros(x.shape[0], whole_delta(adapters[0], layer, module, x[:1]).shape[1])
    for slot, adapter in enumerate(adapters):
        rows = token_slots == slot
        if (layer, module) in adapter.weights:
            out[rows] = whole_delta(adapter, layer, module, x[rows])
    return out


def test_a_merged_adapter_is_merged_whole_then_cut():
    """TIES prunes by magnitude over the whole tensor: cutting first would keep other
    entries. Merging whole and cutting gives each rank the whole merge's part."""
    model = arch()
    parts_of = shards(2, model)[1].lora_parts()
    components = [random_adapter(model, 4, 7), random_adapter(model, 4, 8)]
    merged = merge_adapters(components, [0.7, 0.3], "ties", density=0.3)
    cut = shard_adapter(merged, parts_of, 2)
    a, b = merged.weights[(0, "q_proj")]
    a1, b1 = cut.weights[(0, "q_proj")]
    assert torch.equal(a1, a) and torch.equal(b1, b[32:])
    a, b = merged.weights[(1, "down_proj")]
    a1, b1 = cut.weights[(1, "down_proj")]
    assert torch.equal(a1, a[:, 48:]) and torch.equal(b1, b)
    cut_first = merge_adapters([shard_adapter(c, parts_of, 2) for c in components],
                               [0.7, 0.3], "ties", density=0.3)
    assert not torch.equal(cut_first.weights[(1, "down_proj")][0], a1)
