"""Load a LoRA adapter saved by PEFT (adapter_config.json + adapter_model.safetensors).

The result is a `LoraAdapter`: per (layer, module) an `A [r, in]` and a `B [out, r]` with the
scale (lora_alpha / r, or / sqrt(r) with rsLoRA) already folded into B, so the hot path never
scales. Anything loraxd cannot apply exactly as PEFT would is refused with
`AdapterIncompatible(reason)`, a one-line reason naming the key, module or shape at fault;
peft_fields.py says what is done with each adapter_config.json field. The adapter is untrusted:
its patterns are matched by RE2 (patterns.py; which modules they target: peft_targets.py),
and limits.py bounds where its files lie, its rank and its size before the weights are read.

Fused checkpoints (Phi-3's qkv_proj = q|k|v, gate_up_proj = gate|up): the adapter is read
against the checkpoint's own linears, and each fused module's (A, B) becomes one entry per part,
the same A with B's rows cut at the parts' widths, which is the fused delta exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from loraxd.worker.lora import peft_fields
from loraxd.worker.lora.errors import AdapterIncompatible
from loraxd.worker.lora.limits import MAX_CONFIG_BYTES, AdapterLimits
from loraxd.worker.lora.patterns import compile_pattern
from loraxd.worker.lora.peft_targets import (EMBEDDING_MODULES, fused_hint, layer_index,
                                              targeted_modules)

__all__ = ["AdapterIncompatible", "AdapterLimits", "LoraAdapter", "load_peft_adapter"]

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's weights, scale folded into B. Keys are (layer_idx, module name), names
    as in `module_shapes` (a fused module's parts, never the fused name)."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # A [r, in], B [out, r]
    ranks: dict[tuple[int, str], int]
    num_bytes: int

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.weights)


def load_peft_adapter(
    path: str,
    module_shapes: dict[str, tuple[int, int]],
    num_layers: int,
    dtype: torch.dtype = torch.float32,
    *,
    fused_modules: dict[str, tuple[str, ...]] | None = None,
    limits: AdapterLimits | None = None,
) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; `module_shapes`: module name -> (in, out).

    `fused_modules`: a linear of the checkpoint -> the `module_shapes` modules it stacks along
    its output, in order (Phi-3: {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj":
    ("gate_proj", "up_proj")}). The adapter then targets the fused names, never the parts, and
    each fused module's weights are returned as entries of its parts.

    `limits`: where the files may lie, the largest rank and size; checked before the weights
    are read."""
    limits = limits or AdapterLimits()
    fused = dict(fused_modules or {})
    linears = _checkpoint_linears(module_shapes, fused)
    config = _read_config(path, limits)
    _check_config(config)
    limits.check_config(config)
    tensors = _read_tensors(path, limits, dtype.itemsize)
    pairs = _group_keys(tensors, linears, num_layers, config, fused)
    targeted = targeted_modules(config, pairs, linears, num_layers, fused)
    for full_name in pairs:
        if full_name not in targeted:
            raise AdapterIncompatible(
                f"weights for {full_name} but adapter_config.json's target_modules "
                f"does not target it")
    patterns = {field: _compiled_keys(config, field) for field in ("rank_pattern", "alpha_pattern")}
    weights, ranks, num_bytes = {}, {}, 0
    for full_name, (layer_idx, module) in targeted.items():
        ab = pairs.get(full_name, {})
        for part in ("A", "B"):
            if part not in ab:
                raise AdapterIncompatible(
                    f"missing lora_{part} weight for targeted module {full_name}")
        a, b = _check_shapes(full_name, ab["A"], ab["B"], linears[module], config)
        r, scale = _rank_and_scale(config, full_name, patterns)
        if a.shape[0] != r:
            raise AdapterIncompatible(
                f"{full_name}: lora_A has rank {a.shape[0]} but adapter_config.json says r={r}")
        a = a.to(torch.float32).to(dtype).contiguous()
        b = (b.to(torch.float32) * scale).to(dtype).contiguous()
        num_bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        row = 0
        for part in fused.get(module, (module,)):  # B's rows part by part; A is shared
            out = module_shapes[part][1]
            weights[(layer_idx, part)] = (a, b[row:row + out])
            ranks[(layer_idx, part)] = r
            row += out
    if not weights:
        raise AdapterIncompatible("adapter targets no module of this model")
    return LoraAdapter(weights=weights, ranks=ranks, num_bytes=num_bytes)


def _checkpoint_linears(module_shapes, fused) -> dict[str, tuple[int, int]]:
    """The checkpoint's LoRA-capable linears -> (in, out): fused ones in place of their parts."""
    linears: dict[str, tuple[int, int]] = {}
    part_of = {part: name for name, parts in fused.items() for part in parts}
    for name, parts in fused.items():
        if name in module_shapes or not parts or any(p not in module_shapes for p in parts):
            raise ValueError(f"fused_modules[{name!r}] = {parts}: the parts must be modules of "
                             f"module_shapes and the fused name must not")
        if len({module_shapes[p][0] for p in parts}) != 1:
            raise ValueError(f"fused module {name!r}: parts {parts} differ in in_features")
    for module, shape in module_shapes.items():
        name = part_of.get(module)
        if name is None:
            linears[module] = shape
        elif name not in linears:
            parts = fused[name]
            linears[name] = (shape[0], sum(module_shapes[p][1] for p in parts))
    return linears


def _read_config(path: str, limits: AdapterLimits) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        real_path = limits.checked_file(config_path, CONFIG_FILE, MAX_CONFIG_BYTES)
        with open(real_path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterIncompatible(f"{config_path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterIncompatible(f"{config_path}: unreadable: {e}") from None
    if not isinstance(config, dict):
        raise AdapterIncompatible(f"{config_path}: expected a JSON object")
    return config


def _check_config(config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterIncompatible(f"peft_type {peft_type!r} is not supported (only LORA)")
    reason = peft_fields.refusal(config)
    if reason:
        raise AdapterIncompatible(reason)
    unknown = peft_fields.unknown_fields(config)
    if unknown:  # as PEFT does (see peft_fields.py)
        log.warning("adapter_config.json: ignoring keys PEFT's LoraConfig doesn't know "
                    "(saved by a newer PEFT?): %s", ", ".join(unknown))
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterIncompatible(f"adapter_config.json: r={r!r} is not a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterIncompatible(f"adapter_config.json: lora_alpha={alpha!r} is not a number")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise AdapterIncompatible(f"adapter_config.json: {field} must be an object")
    layers_pattern = config.get("layers_pattern")
    if layers_pattern is not None and not (isinstance(layers_pattern, str) or (
            isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern))):
        raise AdapterIncompatible(f"adapter_config.json: layers_pattern={layers_pattern!r} "
                                  "must be a string or a list of strings")


def _read_tensors(path: str, limits: AdapterLimits, item_bytes: int) -> dict[str, torch.Tensor]:
    st_path, bin_path = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, BIN_FILE)
    try:
        if os.path.exists(st_path):
            from safetensors.torch import load_file

            real_path = limits.checked_file(st_path, SAFETENSORS_FILE, limits.max_bytes)
            limits.check_safetensors(real_path, item_bytes)
            tensors = load_file(real_path, device="cpu")
        elif os.path.exists(bin_path):
            real_path = limits.checked_file(bin_path, BIN_FILE, limits.max_bytes)
            tensors = torch.load(real_path, map_location="cpu", weights_only=True)
        else:
            raise AdapterIncompatible(f"neither {SAFETENSORS_FILE} nor {BIN_FILE} in {path}")
    except AdapterIncompatible:
        raise
    except Exception as e:  # safetensors / unpickler raise many types on a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterIncompatible(f"adapter weights in {path} unreadable: {first_line}") from None
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise AdapterIncompatible(f"adapter weights in {path}: not a name -> tensor mapping")
    # A .bin has no header to read first; its size on disk was bounded.
    limits.check_memory(sum(t.numel() * max(t.element_size(), item_bytes)
                            for t in tensors.values()))
    return tensors


def _group_keys(tensors, linears, num_layers, config, fused) -> dict[str, dict]:
    """full module name -> {"A": tensor, "B": tensor}; refuses keys we can't place."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    unused = peft_fields.unused_weight_markers(config)
    for key, tensor in tensors.items():
        if any(marker in key for marker in unused):
            continue
        if "lora_magnitude_vector" in key:
            raise AdapterIncompatible(f"DoRA weights ({key}) are not supported")
        if "lora_embedding_" in key or any(f".{m}." in f".{key}" for m in EMBEDDING_MODULES):
            raise AdapterIncompatible(f"embedding / lm_head weights ({key}) are not supported")
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterIncompatible(f"unexpected key {key} in adapter weights")
        adapter_names.add(match["name"] or "")
        full_name = match["module"].removeprefix(_PREFIX)
        module = full_name.rsplit(".", 1)[-1]
        if module not in linears:
            raise AdapterIncompatible(
                f"key {key}: module {module!r} is not a LoRA target loraxd supports "
                f"({', '.join(sorted(linears))}){fused_hint(module, fused)}")
        layer_idx = layer_index(full_name, config)
        if layer_idx is None:
            raise AdapterIncompatible(f"key {key}: no layer index in the module name")
        if layer_idx >= num_layers:
            raise AdapterIncompatible(
                f"key {key}: layer {layer_idx} but the model has {num_layers} layers")
        if tensor.dim() != 2:
            raise AdapterIncompatible(
                f"key {key}: expected a 2-d tensor, got shape {tuple(tensor.shape)}")
        pairs.setdefault(full_name, {})[match["ab"]] = tensor
    if len(adapter_names) > 1:
        raise AdapterIncompatible(
            f"weights of several adapters in one file: {sorted(adapter_names)}")
    if not pairs:
        raise AdapterIncompatible("adapter weights file holds no lora_A/lora_B weights")
    return pairs


def _check_shapes(full_name, a, b, shape, config) -> tuple[torch.Tensor, torch.Tensor]:
    in_features, out_features = shape
    if config.get("fan_in_fan_out") and a.shape[1] != in_features and a.shape[0] == in_features:
        a, b = a.t(), b.t()  # stored transposed ([in, r], [r, out])
    if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
        raise AdapterIncompatible(
            f"{full_name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} don't fit a "
            f"{in_features} -> {out_features} linear (adapter made for another model?)")
    return a, b


def _compiled_keys(config: dict, field: str) -> list:
    """[(regex, value)] of rank_pattern / alpha_pattern, each key compiled once per adapter."""
    return [(compile_pattern(key, f"{field} key", r"(.*\.)?({})$"), value)
            for key, value in (config.get(field) or {}).items()]


def _pattern_value(keys: list, full_name: str, default):
    """PEFT's get_pattern_key: the first key that matches a suffix of the module name."""
    for regex, value in keys:
        if regex.match(full_name):
            return value
    return default


def _rank_and_scale(config: dict, full_name: str, patterns: dict) -> tuple[int, float]:
    r = _pattern_value(patterns["rank_pattern"], full_name, config.get("r", 8))
    alpha = _pattern_value(patterns["alpha_pattern"], full_name, config.get("lora_alpha", 8))
    if not isinstance(r, int) or r <= 0:
        raise AdapterIncompatible(f"{full_name}: rank {r!r} is not a positive integer")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale
