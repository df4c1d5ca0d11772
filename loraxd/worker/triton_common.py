"""Helpers shared by the Triton kernels (imports triton: only the kernel modules import it)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, UPCAST: tl.constexpr):
    """a @ b with an fp32 accumulator. Triton's interpreter cannot multiply bfloat16 (it holds
    it as uint16), so under it (`UPCAST`) the operands go in as fp32; on a GPU as stored."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def tanh(x):
    """tanh from exp (tl has none on every backend); saturates to +-1 without NaN."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
