"""`scripts/bench_kernels.py --lora`, the step's batched-LoRA sweep the notes' figures come
from: it runs on the CPU kernels and prints one line per row count, with the adapters' bytes
it moved (8 rank-16 all-linear adapters over SmolLM2-135M's 30 layers: 156 MB in fp32)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from loraxd.worker import cpu_kernels  # noqa: E402

REASON = cpu_kernels.enable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no CPU kernels: {REASON}")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


@pytest.mark.parametrize("dtype, megabytes", [("float32", 156), ("bfloat16", 78)])
def test_lora_sweep_prints_a_line_per_row_count(dtype, megabytes):
    done = subprocess.run([sys.executable, str(SCRIPT), "--lora", "--rows", "1", "8",
                           "--rounds", "1", "--dtype", dtype],
                          capture_output=True, text=True, timeout=300, check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    assert "M=1 " in lines[0] and "on 1 adapters" in lines[0]
    assert "M=8 " in lines[1] and "on 8 adapters" in lines[1]
    assert re.search(rf"GB/s of {megabytes} MB\); the 120 calls' dispatch [0-9.]+ ms$",
                     lines[1]), lines[1]
