"""Compile every Triton kernel to a cubin for the given CUDA architectures, with no GPU: the
compiled-mode frontend, the backend and ptxas accept them as the wrappers launch them
(the interpreter checks their numbers, not this). Run as a script, without TRITON_INTERPRET:
`python -m tests.unit.triton_compile 90 80`."""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraxd.worker.layers import attention_kernels as ak
from loraxd.worker.layers.triton_attention import TritonAttention
from loraxd.worker.lora import triton_kernels as lk
from loraxd.worker.lora import triton_op


def _compile(fn, arch: int, types: dict, constexprs: dict) -> None:
    signature = {name: "constexpr" if name in constexprs else types[name]
                 for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs),
                            target=GPUTarget("cuda", arch, 32))
    assert kernel.asm["cubin"], fn.__name__


def lora_kernels(arch: int, dtype: str) -> None:
    p, i32 = f"*{dtype}", "i32"
    ints = dict.fromkeys(("stride_x", "stride_a", "stride_h", "stride_y", "in_features",
                          "out0", "out1", "out2", "max_rank"), i32)
    ptrs = dict(x_ptr=p, a_ptr=p, y_ptr=p, b0=p, b1=p, b2=p, h_ptr="*fp32",
                **dict.fromkeys(("tok_ptr", "slot_ptr", "rtot_ptr", "rank_ptr", "hoff_ptr",
                                 "row_ptr", "nrows_ptr"), "*i32"))
    types = {**ints, **ptrs}
    blocks = dict(BLOCK_R=triton_op.BLOCK_R, BLOCK_K=triton_op.BLOCK_K)
    expand = dict(BLOCK_R=triton_op.BLOCK_R_EXPAND, BLOCK_N=triton_op.BLOCK_N)
    for modules in (1, 2, 3):
        _compile(lk.expand_tokens, arch, types, dict(NUM_MODULES=modules, **expand))
        _compile(lk.expand_blocks, arch, types,
                 dict(NUM_MODULES=modules, BLOCK_M=16, UPCAST=False, **expand))
    _compile(lk.shrink_tokens, arch, types, blocks)
    _compile(lk.shrink_blocks, arch, types, dict(BLOCK_M=16, UPCAST=False, **blocks))


def attention_kernels(arch: int, dtype: str) -> None:
    p = f"*{dtype}"
    types = dict(q_ptr=p, cache_ptr=p, out_ptr=p, qkv_ptr=p, table_ptr="*i64",
                 lens_ptr="*i64", start_ptr="*i32", first_ptr="*i32", len_ptr="*i32",
                 scale="fp32", softcap="fp32",
                 **dict.fromkeys(("stride_q", "stride_out", "stride_table", "stride_qkv",
                                  "window"), "i32"))
    wrapper = TritonAttention()
    # Llama-3-8B's heads (32 query, 8 KV, 128 wide); Gemma 2's 256-wide, windowed, capped
    for head_dim, window, cap in ((128, False, False), (128, True, False), (256, True, True)):
        flags = dict(HAS_WINDOW=window, HAS_SOFTCAP=cap, UPCAST=False,
                     BLOCK_N=wrapper.block_n)
        _compile(ak.decode_attention, arch, types,
                 dict(KV_HEADS=8, GROUP=4, HEAD_DIM=head_dim, PAGE=16, BLOCK_G=16,
                      BLOCK_D=head_dim, **flags))
        _compile(ak.prefill_attention, arch, types,
                 dict(HEADS=32, KV_HEADS=8, HEAD_DIM=head_dim, BLOCK_M=wrapper.block_m,
                      BLOCK_D=head_dim, **flags))


def main(archs: list[int]) -> None:
    for arch in archs:
        lora_kernels(arch, "bf16")
        attention_kernels(arch, "bf16")
        print(f"sm_{arch}: every kernel compiles", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
