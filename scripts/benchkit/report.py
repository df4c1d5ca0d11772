"""The comparison as markdown tables (to paste into an issue) and as JSON."""
from __future__ import annotations

import math
import os
import platform

from scripts.benchkit.stats import ratios

METRICS = [("tok_s", "tok/s"), ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"),
           ("itl_ms_p50", "ITL p50 ms"), ("itl_ms_p99", "ITL p99 ms")]


# the vector extensions that decide CPU matmul speed
_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd",
        "sve")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _field(cpuinfo: str, *names: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def cpu_model_name(cpuinfo: str | None = None) -> str:
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    return (_field(cpuinfo, "model name", "Model name") or platform.processor()
            or platform.machine())


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set((_field(cpuinfo, "flags", "Features") or "").split())
    return [f for f in _ISA if f in flags]


def _num(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def agreement(ours: list[str], theirs: list[str]) -> str:
    """How many of the probe texts (base model, then each adapter) are loraxd's."""
    same = sum(a == b for a, b in zip(ours, theirs))
    return f"{same} of {len(ours)}"


def build(machine: dict, roof: dict, results: dict, skipped: dict, loads: list,
          probes: dict | None = None, reference: str = "loraxd") -> dict:
    """The JSON document: `results[system][load key]` rows, each with its share of the
    load's roofline, loraxd's ratios to each peer, and how many greedy probe texts each
    peer shares with loraxd (all of them: the same model and adapters run)."""
    probes = probes or {}
    for system, by_load in results.items():
        for key, row in by_load.items():
            own = roof.get("systems", {}).get(system, roof)  # precisions: their own bytes
            row["roofline_share"] = row["tok_s"] / own["loads"][key]["max_tok_s"]
    ours = results.get(reference, {})
    table = {peer: {key: ratios(ours[key], row) for key, row in by_load.items() if key in ours}
             for peer, by_load in results.items() if peer != reference}
    return {"machine": machine, "roofline": roof, "loads": [load.key for load in loads],
            "load_names": {load.key: load.name for load in loads}, "results": results,
            "ratios": {f"{reference}/{peer}": r for peer, r in table.items()},
            "skipped": skipped, "probe_texts": probes,
            "probe_agreement": {peer: agreement(probes[reference], texts)
                                for peer, texts in probes.items()
                                if peer != reference and reference in probes}}


def _samples(roof: dict) -> str:
    """How the bandwidth was sampled, where it was more than once."""
    samples = roof.get("bandwidth_samples_gb_s", [])
    if len(samples) < 2:
        return ""
    return (", the better of the run's start and end: "
            + " and ".join(f"{b:.1f}" for b in samples) + " GB/s")


def render(doc: dict) -> str:
    m, roof = doc["machine"], doc["roofline"]
    lines = [f"machine: {m['cpu']} ({' '.join(m.get('cpu_features', []))}), {m['cpus']} CPUs; "
             f"{m['threads']} threads per system; {m['workload']}",
             f"read bandwidth ({m['threads']} threads, x.sum() over 256 MiB, best of "
             f"{roof['bandwidth_repeats']}{_samples(roof)}): {roof['bandwidth_gb_s']:.1f} GB/s; "
             f"weights "
             f"{roof['weight_bytes'] / 1e6:.1f} MB, each adapter "
             f"{roof['adapter_bytes'] / 1e6:.1f} MB, KV cache "
             f"{roof['kv_bytes_per_token'] / 1e3:.1f} kB per token (not in the roofline)"]
    if "matmul_gflop_s" in roof:
        lines.append(f"matmul peak ({m['threads']} threads, torch, n=1536): "
                     f"{roof['matmul_gflop_s']:.0f} GFLOP/s")
    lines.append("")
    names = doc["load_names"]
    lines += _table(["load", "bytes per step", "memory: max tok/s", "compute: max tok/s",
                     "max tok/s (bound)"], [
        [names[k], f"{r['step_bytes'] / 1e6:.0f} MB", _num(r.get("memory_tok_s",
                                                                  r["max_tok_s"]), 0),
         _num(r["compute_tok_s"], 0) if "compute_tok_s" in r else "-",
         f"{_num(r['max_tok_s'], 0)} ({r.get('bound', 'memory')})"]
        for k, r in roof["loads"].items()])
    for system, own in roof.get("systems", {}).items():
        lines.append(f"{system} reads weights {own['weight_bytes'] / 1e6:.1f} MB, each adapter "
                     f"{own['adapter_bytes'] / 1e6:.1f} MB: memory max tok/s " + ", ".join(
                         f"{names[k]} {_num(r['max_tok_s'], 0)}"
                         for k, r in own["loads"].items()) + " (its share below is of these)")
    rows = []
    for key in doc["loads"]:
        for system, by_load in doc["results"].items():
            if key in by_load:
                row = by_load[key]
                rows.append([names[key], system, *(_num(row[k]) for k, _ in METRICS),
                             f"{100 * row['roofline_share']:.0f}%"])
    lines += ["", *_table(["load", "system", *(h for _, h in METRICS), "of roofline"], rows)]
    ratio_rows = [[names[key], pair, *(_num(r[k], 2) for k, _ in METRICS)]
                  for key in doc["loads"] for pair, by_load in doc["ratios"].items()
                  for k2, r in by_load.items() if k2 == key]
    if ratio_rows:
        lines += ["", "ratios (tok/s above 1 and latencies below 1 favour loraxd):",
                  *_table(["load", "ratio", *(h for _, h in METRICS)], ratio_rows)]
    lines.append("")
    for system, info in m.get("systems", {}).items():
        if info:
            lines.append(f"{system}: " + "; ".join(
                f"{k} {_num(v) if isinstance(v, float) else v}" for k, v in info.items()))
    for peer, same in doc.get("probe_agreement", {}).items():
        lines.append(f"{peer}: greedy probe texts (base, then each adapter) equal to loraxd's: "
                     f"{same}")
    for system, why in doc["skipped"].items():
        lines.append(f"skipped {system}: {why}")
    return "\n".join(lines)


def machine_info(threads: int, workload: str) -> dict:
    return {"cpu": cpu_model_name(), "cpu_features": cpu_features(),
            "cpus": len(os.sched_getaffinity(0)), "threads": threads,
            "workload": workload, "systems": {}}
