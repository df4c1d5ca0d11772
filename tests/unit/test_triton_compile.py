"""Every Triton kernel compiles to a cubin for sm_90 (H100/H200) and sm_80 (A100) in bf16,
without a GPU (see triton_compile.py); a fresh interpreter, since the kernel modules
of this one may have been imported under TRITON_INTERPRET."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.unit.triton_env import SKIP_NO_TRITON

pytestmark = SKIP_NO_TRITON
ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    proc = subprocess.run([sys.executable, "-m", "tests.unit.triton_compile", "90", "80"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split("\n")[:2] == ["sm_90: every kernel compiles",
                                           "sm_80: every kernel compiles"]
