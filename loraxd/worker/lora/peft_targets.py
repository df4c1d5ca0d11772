"""Which modules of the model a PEFT adapter config targets, found as PEFT finds them:
layer indices (`layers_pattern`), target and exclude lists or patterns (RE2), `all-linear`,
and the fused modules of checkpoints such as Phi-3's.
"""

from __future__ import annotations

import re

from loraxd.worker.lora.errors import AdapterIncompatible
from loraxd.worker.lora.patterns import compile_pattern, fullmatch

# Where each LoRA-capable module sits in a Llama-family decoder layer (HF names).
MODULE_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "qkv_proj": "self_attn", "gate_up_proj": "mlp",  # fused (Phi-3)
}
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_out")
def fused_hint(module: str, fused) -> str:
    """Why a part module can't be targeted when the checkpoint only has the fused one."""
    for name, parts in fused.items():
        if module in parts:
            return (f"; this model's checkpoint has the fused {name} ({' | '.join(parts)}), "
                    f"so its adapters target {name}")
    return ""


def layer_index(full_name: str, config: dict) -> int | None:
    """The first numbered segment (after `layers_pattern` when given), as PEFT finds it."""
    patterns = config.get("layers_pattern") or None
    if patterns is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", full_name) or re.match(
            r"^[^.]*\.(?P<idx>\d+)\.", full_name)
        return int(match["idx"]) if match else None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        regex = compile_pattern(pattern, "layers_pattern", r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
        match = regex.match(full_name)
        if match:
            return int(match.group("idx"))
    return None


def _candidate_names(pairs, linears, num_layers, config) -> dict[str, tuple[int, str]]:
    """Every module of the model a config could target, named as in this adapter's file."""
    templates: dict[str, str] = {}  # module -> name with "{}" for the layer index
    prefix = None
    for full_name in pairs:
        layer_idx = layer_index(full_name, config)
        match = re.search(rf"(?:^|\.){layer_idx}\.", full_name)
        head, tail = full_name[:match.start()], full_name[match.end():]
        sep = "." if match.group().startswith(".") else ""
        templates[full_name.rsplit(".", 1)[-1]] = f"{head}{sep}{{}}.{tail}"
        prefix = prefix or f"{head}{sep}"
    names = {}
    for module in linears:
        parent = MODULE_PARENTS.get(module, "")
        template = templates.get(module) or f"{prefix}{{}}.{parent}.{module}"
        for layer_idx in range(num_layers):
            names[template.format(layer_idx)] = (layer_idx, module)
    return names


def _matches(config: dict, target, full_name: str, layer_idx: int) -> bool:
    """PEFT's check_target_module_exists, exclusions aside: a regex is matched against the full
    name and ignores layers_to_transform; a list entry matches the full name or a suffix."""
    if isinstance(target, str):
        return fullmatch(target, full_name, "target_modules")
    if full_name in target:
        return True
    if not any(full_name.endswith(f".{t}") for t in target):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    return layer_idx == layers if isinstance(layers, int) else layer_idx in layers


def _excluded(config: dict, full_name: str) -> bool:
    exclude = config.get("exclude_modules")
    if not exclude:
        return False
    if isinstance(exclude, str):
        return fullmatch(exclude, full_name, "exclude_modules")
    return full_name in exclude or any(full_name.endswith(f".{e}") for e in exclude)


def targeted_modules(config, pairs, linears, num_layers, fused) -> dict[str, tuple[int, str]]:
    """full name -> (layer, module) for every module the config targets."""
    candidates = _candidate_names(pairs, linears, num_layers, config)
    target = config.get("target_modules")
    if target is None:  # PEFT filled in defaults when training; the weights say which
        return {name: candidates.get(name) or _place(name, config) for name in pairs}
    if isinstance(target, str) and target.lower() == "all-linear":
        target = list(linears)  # the checkpoint's linears (PEFT: all but the output layer)
    if not isinstance(target, (str, list)):
        raise AdapterIncompatible(f"target_modules={target!r}: expected a list or a regex string")
    if isinstance(target, str):
        compile_pattern(target, "target_modules")
    _check_targets_known(target, candidates, linears, fused)
    return {
        name: place for name, place in candidates.items()
        if _matches(config, target, name, place[0]) and not _excluded(config, name)
    }


def _place(full_name: str, config: dict) -> tuple[int, str]:
    return layer_index(full_name, config), full_name.rsplit(".", 1)[-1]


def _check_targets_known(target, candidates, linears, fused) -> None:
    prefixes = {name.split(".layers.")[0] for name in candidates if ".layers." in name} or {"model"}
    embeddings = [*EMBEDDING_MODULES, *(f"{p}.{m}" for p in prefixes for m in EMBEDDING_MODULES)]
    if isinstance(target, str):
        hit = [name for name in embeddings if fullmatch(target, name, "target_modules")]
        if hit:
            raise AdapterIncompatible(
                f"target_modules regex {target!r} targets {hit[0]}, not supported")
        if not any(fullmatch(target, name, "target_modules") for name in candidates):
            part = next((p for name, p in _part_names(candidates, fused)
                         if fullmatch(target, name, "target_modules")), "")
            raise AdapterIncompatible(
                f"target_modules regex {target!r} matches no module loraxd supports"
                f"{fused_hint(part, fused)}")
        return
    for entry in target:
        if not isinstance(entry, str):
            raise AdapterIncompatible(f"target_modules entry {entry!r} is not a string")
        if entry.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
            raise AdapterIncompatible(
                f"target module {entry!r} (embedding / lm_head) is not supported")
        if not any(name == entry or name.endswith(f".{entry}") for name in candidates):
            raise AdapterIncompatible(
                f"target module {entry!r} is not one loraxd supports "
                f"({', '.join(sorted(linears))}){fused_hint(entry.rsplit('.', 1)[-1], fused)}")


def _part_names(candidates, fused):
    """(name, part) for each part module as it would be named if it were not fused."""
    for name, (_, module) in candidates.items():
        for part in fused.get(module, ()):
            yield f"{name[:-len(module)]}{part}", part
