"""How a model splits over tensor-parallel ranks, and what it refuses.

Megatron's layout: q/k/v and gate/up column-parallel (each rank its heads, its slice of the
intermediate features), o and down row-parallel (each rank multiplies its slice of the
input; one all-reduce sums them). Attention then runs on a rank's own heads with no
communication, and its KV cache holds only those heads.

KV heads fewer than ranks (GQA): each KV head is replicated on world_size / num_kv_heads
neighbouring ranks, the ranks whose query heads read it, as vLLM does. Head counts that do
not split evenly are refused, naming the counts.

The LoRA of a module is cut like its base weight (`lora_parts`): column-parallel, A whole
and B's output rows split; row-parallel, A's input columns split and B whole, so the
partial delta joins the partial base output before the one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraxd.worker.distributed import ShardSpec
from loraxd.worker.models.arch import ModelArch
from loraxd.worker.models.hf_config import UnsupportedModel

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")


@dataclass(frozen=True)
class ModelShard:
    """One rank's share of a model."""

    arch: ModelArch
    shard: ShardSpec

    @property
    def world_size(self) -> int:
        return self.shard.world_size

    @property
    def num_heads(self) -> int:
        return self.arch.num_heads // self.world_size

    @property
    def kv_replicas(self) -> int:
        """Ranks that hold each KV head (1 unless there are fewer KV heads than ranks)."""
        return max(1, self.world_size // self.arch.num_kv_heads)

    @property
    def num_kv_heads(self) -> int:
        return self.arch.num_kv_heads * self.kv_replicas // self.world_size

    @property
    def intermediate_size(self) -> int:
        return self.arch.intermediate_size // self.world_size

    def lora_parts(self) -> dict[str, tuple[str, slice]]:
        """Module -> ("out", rows of B) for column-parallel modules, ("in", columns of A)
        for row-parallel ones: the part of each adapter tensor this rank keeps."""
        arch, part = self.arch, self.shard.part
        q, kv, i = (arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim,
                    arch.intermediate_size)
        return {"q_proj": ("out", part(q)), "k_proj": ("out", part(kv, self.kv_replicas)),
                "v_proj": ("out", part(kv, self.kv_replicas)), "o_proj": ("in", part(q)),
                "gate_proj": ("out", part(i)), "up_proj": ("out", part(i)),
                "down_proj": ("in", part(i))}

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable module on this rank."""
        shapes = dict(self.arch.module_shapes())
        for module, (side, cut) in self.lora_parts().items():
            size = cut.stop - cut.start
            fan_in, fan_out = shapes[module]
            shapes[module] = (size, fan_out) if side == "in" else (fan_in, size)
        return shapes


def shard_model(arch: ModelArch, shard: ShardSpec) -> ModelShard:
    """This rank's share; UnsupportedModel when the heads or features do not split."""
    n = shard.world_size
    heads, kv_heads = arch.num_heads, arch.num_kv_heads
    if heads % n:
        raise UnsupportedModel(f"{heads} attention heads do not split over {n} ranks "
                               f"(num_shard); use a num_shard that divides {heads}")
    if kv_heads % n and n % kv_heads:
        raise UnsupportedModel(
            f"{kv_heads} KV heads do not split over {n} ranks (num_shard), nor does {n} "
            f"split into copies of them; use a num_shard that divides {kv_heads} or that "
            f"{kv_heads} divides")
    if arch.intermediate_size % n:
        raise UnsupportedModel(f"intermediate_size {arch.intermediate_size} does not split "
                               f"over {n} ranks (num_shard)")
    return ModelShard(arch, shard)
