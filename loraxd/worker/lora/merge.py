"""Per-request merged adapters (LoRAX's `merged_adapters`): several LoRAs become one.

As in LoRAX, for every (layer, module) the merged A is the merge of the components' A tensors
and the merged B the merge of their B tensors, each merged on its own as a "task tensor" with
the strategies of PEFT's `peft.utils.merge_utils` (mergekit's methods). So the merged delta
`B A` is not the weighted sum of the component deltas: cross terms `B_i A_j` appear; that is
what LoRAX computes and what its users tuned their weights against.

Strategies, per task tensor list `t_i` with weights `w_i`:
  linear       Σ w_i t_i (task arithmetic).
  ties         keep the top `density` fraction of each t_i by |value| (k = int(density *
               numel), as PEFT), elect each entry's sign from the unweighted pruned tensors
               (`total`: sign of their sum; `frequency`: sign of the sum of their signs; a tie
               elects +), then disjoint merge: Σ of the weighted entries that have the elected
               sign / the number of such entries (at least 1).
  dare_linear  keep each entry with probability `density` and divide the kept by `density`,
               then linear.
  dare_ties    that random prune, then the sign election and disjoint merge of ties.
With density >= 1 nothing is pruned (nor rescaled), as in PEFT.

Decisions (where the inputs go beyond LoRAX's, or where we must pick):
- Ranks. LoRAX refuses components of different ranks; we zero-pad A (extra rows) and B
  (extra columns) to the largest rank for that module, which leaves every delta unchanged.
  Pruning is done on each tensor at its own rank first (so `density` means the same fraction
  of a rank-4 tensor whatever the other ranks are), then the padded tensors are combined.
- Partial targets. A module only some components target is merged from those components
  alone (LoRAX does this). It is the same as the others contributing zero tensors: a zero
  entry adds nothing to a sum, never has the elected sign, and so never counts in the
  disjoint merge's divisor. The merged adapter targets the union of the modules.
- Scale. Components arrive with their own scale (alpha / r) folded into B, so each B is
  merged as its adapter actually applies it, and the merged adapter's scale is 1. LoRAX
  merges raw B's and applies the first component's alpha / r to the result; the two agree
  whenever the components share their scale (LoRAX's equal-rank case with equal alphas).
- Randomness (DARE). Each (layer, module, A|B) gets its own `torch.Generator` seeded from
  `seed` and that key (`part_seed`), and the present components are pruned in order with it,
  drawing exactly as PEFT's `random_pruning` does from the global generator. So a merge is
  reproducible from its recipe, and a module's draws don't depend on the other modules.
- density 0 with DARE: PEFT divides zeros by zero (NaN); we return zeros.
- Arithmetic is float32; the merged tensors take the dtype and device of the components'.
"""

from __future__ import annotations

import hashlib

import torch

from loraxd.worker.lora.peft_format import LoraAdapter

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


class MergeError(ValueError):
    """The merge request can't be done; the message says why in one line."""


def merge_adapters(
    adapters: list[LoraAdapter],
    weights: list[float],
    strategy: str = "linear",
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> LoraAdapter:
    """Merge `adapters` with `weights` by `strategy`; the result is a normal `LoraAdapter`."""
    _check_args(adapters, weights, strategy, density, majority_sign_method)
    keys = sorted({key for adapter in adapters for key in adapter.weights})
    merged, ranks, num_bytes = {}, {}, 0
    for key in keys:
        present = [(w, adapter.weights[key]) for w, adapter in zip(weights, adapters)
                   if key in adapter.weights]
        _check_shapes(key, [ab for _, ab in present])
        part_weights = [float(w) for w, _ in present]
        rank = max(a.shape[0] for _, (a, _) in present)
        parts = []
        for part, dim in (("A", 0), ("B", 1)):  # A [r, in] pads rows, B [out, r] columns
            tensors = [ab[dim] for _, ab in present]
            generator = None
            if strategy.startswith("dare"):
                generator = torch.Generator(device=tensors[0].device)
                generator.manual_seed(part_seed(seed, key, part))
            out = merge_tensors(tensors, part_weights, strategy, density, majority_sign_method,
                                generator=generator, rank=rank, rank_dim=dim)
            parts.append(out.to(tensors[0].dtype).contiguous())
        a, b = parts
        merged[key], ranks[key] = (a, b), rank
        num_bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return LoraAdapter(weights=merged, ranks=ranks, num_bytes=num_bytes)


def merge_tensors(
    tensors: list[torch.Tensor],
    weights: list[float],
    strategy: str,
    density: float = 1.0,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
    rank: int | None = None,
    rank_dim: int = 0,
) -> torch.Tensor:
    """Merge task tensors (float32 result). With `rank`, each pruned tensor is zero-padded
    along `rank_dim` to that size first, so the tensors may differ in that dimension."""
    pruned = [_sparsify(t.float(), strategy, density, generator) for t in tensors]
    if rank is not None:
        pruned = [_pad(t, rank, rank_dim) for t in pruned]
    stacked = torch.stack(pruned)  # [num_tasks, *shape]
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if strategy in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(weighted, mask)


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * numel) entries of largest |value|, zero the rest."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def prune_random(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry with probability `density`, rescaled by 1 / density (DARE)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """[num_tasks, *shape] bool: which entries have their position's elected sign."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(magnitude >= 0, 1.0, -1.0)  # [*shape]
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries that agree with the elected sign (0 where none do)."""
    total = (weighted * mask).sum(dim=0)
    return total / torch.clamp(mask.sum(dim=0), min=1)


def part_seed(seed: int, key: tuple[int, str], part: str) -> int:
    """The generator seed for one (layer, module) key's A or B under merge seed `seed`."""
    text = f"{seed}:{key[0]}:{key[1]}:{part}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _sparsify(tensor, strategy, density, generator) -> torch.Tensor:
    if strategy == "ties":
        return prune_magnitude(tensor, density)
    if strategy.startswith("dare"):
        return prune_random(tensor, density, generator)
    return tensor


def _pad(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = (0, 0, 0, missing) if dim == 0 else (0, missing)
    return torch.nn.functional.pad(tensor, pad)


def _check_args(adapters, weights, strategy, density, majority_sign_method) -> None:
    if not adapters:
        raise MergeError("merge of no adapters")
    if strategy not in STRATEGIES:
        raise MergeError(f"merge_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if len(weights) != len(adapters):
        raise MergeError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w == w
               and abs(w) != float("inf") for w in weights):
        raise MergeError(f"weights {list(weights)!r} must be finite numbers")
    if not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise MergeError(f"density {density!r} is not in [0, 1]")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise MergeError(f"majority_sign_method {majority_sign_method!r} is not one of "
                         f"{', '.join(MAJORITY_SIGN_METHODS)}")


def _check_shapes(key, pairs) -> None:
    in_features, out_features = pairs[0][0].shape[1], pairs[0][1].shape[0]
    for a, b in pairs:
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise MergeError(
                f"layer {key[0]} {key[1]}: components disagree on its shape "
                f"({in_features} -> {out_features} vs {a.shape[1]} -> {b.shape[0]})")
