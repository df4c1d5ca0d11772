"""Whether the worker's Triton kernels can run, and which kernels a device gets.

Triton is an optional dependency (the `gpu` extra): a CPU install never needs it. The kernels
run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
set before the kernel modules are imported), which is how the tests prove them without a GPU.
"""
from __future__ import annotations

import importlib.util

import torch

KERNEL_CHOICES = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter is on: kernels run as numpy on CPU tensors."""
    if not triton_installed():
        return False
    import triton
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # an older triton, which reads the variable itself
        import os
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def triton_runs_on(device: torch.device) -> bool:
    """The kernels can take tensors of `device`: CUDA with triton, or any under the
    interpreter."""
    if not triton_installed():
        return False
    return device.type == "cuda" or interpreting()


def use_triton(kernels: str, device: str | torch.device) -> bool:
    """`kernels`: "auto" (Triton on CUDA when it is installed, else torch), "torch", or
    "triton" (refused where it cannot run)."""
    device = torch.device(device)
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels {kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "torch":
        return False
    if kernels == "auto":
        return device.type == "cuda" and triton_installed()
    if not triton_runs_on(device):
        reason = "triton is not installed (pip install 'loraxd[gpu]')" if not \
            triton_installed() else f"device {device} needs CUDA or TRITON_INTERPRET=1"
        raise ValueError(f"kernels 'triton': {reason}")
    return True
