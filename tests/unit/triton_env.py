"""What the Triton kernel tests share. Without CUDA, Triton's interpreter runs the kernels on
CPU tensors: tests/conftest.py turns it on before anything imports triton (it must be on
when `triton.jit` decorates a function, the language's own included); set here too for a
run that bypasses that conftest.

`DEVICES` parametrizes a test over the CPU (interpreter) and CUDA; each is skipped, with the
reason, where it cannot run, and the whole module is skipped where triton is not installed."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraxd.worker.triton_support import interpreting, triton_installed  # noqa: E402

NO_TRITON = ("triton is not installed (pip install 'loraxd[gpu]', or triton==3.9.0 for the "
             "interpreter tests)")
SKIP_NO_TRITON = pytest.mark.skipif(not triton_installed(), reason=NO_TRITON)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not interpreting(), reason=NO_TRITON if not triton_installed() else
        "CPU tensors need TRITON_INTERPRET=1 (set only without CUDA, so that a GPU runs its "
        "compiled kernels)")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs CUDA")]),
]
