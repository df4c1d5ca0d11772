"""CPU kernels of our own (the *.cpp files here, one library): the fp32 (and int8-weight)
matmul of decode-sized batches (panel_gemm.cpp), fp32 decode attention over the paged KV
cache (paged_attention.cpp, wrapped by attention.py), the small per-layer ops in fp32 and
bf16 (small_ops.cpp, wrapped by small_ops.py: residual add + RMSNorm, the per-head q/k norms
in place, silu(gate) * up, rotary of q and k with the K/V cache write), and batched
heterogeneous LoRA for decode tokens, fp32 or bf16, over the slot pool's layout
(lora_bgmv.cpp, wrapped by loraxd/worker/lora/cpu_bgmv.py), the sampler's argmax with
logsumexp (greedy_pick.cpp), and on CPUs with Intel AMX the bf16 matmul (amx_gemm.cpp) and
the int8 weight-only one (amx_int8.cpp) on the CPU's tile unit, for every row count.

It is compiled on the machine that runs it (`-march=native`, against the installed torch),
once: `python -m loraxd.worker.cpu_kernels` (scripts/setup and scripts/install run it) puts
the library under the environment's prefix; a worker that finds none there builds it into
its cache directory at start (about 45 s on two cores: one compiler per source). The file name carries a hash of the source, the
torch version, the compiler and the CPU's flags, so a library is never loaded on a machine
or torch it was not built for. Without a C++ compiler, or on a CPU without AVX-512, the
linears stay on oneDNN (linear.py), attention on SDPA over gathered pages and LoRA on
embedding bags (lora/ops.py), which compute the same thing more slowly; the worker logs
which runs and why.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))  # in the name's hash too
PANEL_COLS = 32  # output columns per panel; the kernel's kCols
AMX_TILE_N = 16  # output columns per AMX tile: the weight's rows must be a multiple
AMX_K_GROUP = {torch.bfloat16: 2, torch.int8: 4}  # K values side by side in a tile row
AMX_ENABLED = True  # False: bf16 and int8 linears keep their AVX-512/oneDNN paths (A/B, tests)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w")

_state: dict[str, str | None] = {}  # "library": the loaded path; "reason": why none was


class BuildError(RuntimeError):
    pass


def prefix_dir() -> Path:
    """Where set-up puts the library: beside the environment's other shared files."""
    return Path(sys.prefix) / "share" / "loraxd" / "kernels"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags the kernel reports (x86 `flags`, Arm `Features`); None when
    it reports none (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def library_name(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES + HEADERS), torch.__version__.encode(), repr(FLAGS).encode(),
                 repr(version).encode(), " ".join(sorted(cpu_flags() or ())).encode()):
        h.update(part)
        h.update(b"\0")
    return f"loraxd_cpu-{h.hexdigest()[:16]}.so"


def build(directory: Path, compiler: str) -> Path:
    """Compile the library into `directory` (atomically: ranks may build at once), one
    compiler per source at once, then link."""
    from torch.utils.cpp_extension import include_paths, library_paths
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / library_name(compiler)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = [f for f in FLAGS if f != "-shared"]
    with tempfile.TemporaryDirectory(dir=directory) as work:
        objects = [Path(work) / f"{src.stem}.o" for src in SOURCES]
        jobs = [subprocess.Popen([compiler, *compile_flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                                  *(f"-I{p}" for p in include_paths()), "-c", str(src),
                                  "-o", str(obj)], stderr=subprocess.PIPE, text=True)
                for src, obj in zip(SOURCES, objects)]
        errors = [job.communicate()[1] for job in jobs]
        failed = [e for job, e in zip(jobs, errors) if job.returncode != 0]
        if failed:
            raise BuildError(f"{compiler} failed: {failed[0].strip()[-2000:]}")
        tmp = Path(work) / "library.so"
        done = subprocess.run([compiler, *FLAGS, *map(str, objects), "-o", str(tmp),
                               *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"{compiler} failed to link: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # the service may run as another user than set-up
        os.replace(tmp, target)
    return target


def enable(build_dir: str | os.PathLike | None = None) -> str | None:
    """Load the CPU kernels, building it into `build_dir` (default: the prefix) if neither
    there nor under the prefix. None once loaded, else the reason it is not; the answer
    of the first call stands for the process."""
    if "reason" in _state:
        return _state["reason"]
    _state["reason"] = reason = _load(Path(build_dir) if build_dir else None)
    return reason


def _load(build_dir: Path | None) -> str | None:
    if "avx512f" not in (cpu_flags() or ()):
        return "this CPU has no AVX-512, which the CPU kernels are written for"
    compiler = _compiler()
    if compiler is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build the CPU kernels"
    name = library_name(compiler)
    dirs = [prefix_dir()] + ([build_dir] if build_dir else [])
    found = next((d / name for d in dirs if (d / name).exists()), None)
    try:
        path = found or build(dirs[-1], compiler)
        torch.ops.load_library(str(path))
    except (OSError, BuildError, RuntimeError) as exc:
        return f"the CPU kernels could not be built or loaded: {exc}"
    _state["library"] = str(path)
    return None


def available() -> bool:
    return _state.get("library") is not None


def library_path() -> str | None:
    return _state.get("library")


def _padded(v: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """A per-column fp32 vector (zeros for None) padded to whole panels."""
    cols = -(-out_features // PANEL_COLS) * PANEL_COLS
    if v is None:
        return torch.zeros(cols)
    return F.pad(v.float(), (0, cols - out_features)).contiguous()


def panels_of(weight: torch.Tensor) -> torch.Tensor:
    """[P, in, 32] panels of a weight [out, in] (fp32 or int8), zero-padded."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL_COLS)
    w = F.pad(weight, (0, 0, 0, panels * PANEL_COLS - out_features))
    return w.view(panels, PANEL_COLS, in_features).transpose(1, 2).contiguous()


def unpanel(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The weight [out, in] that `panels_of` packed."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features]


def pack(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(panels [P, in, 32], bias [P * 32]) of an fp32 weight [out, in]."""
    return panels_of(weight.float()), _padded(bias, weight.shape[0])


def pack_int8(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 panels, fp32 scales, fp32 bias) of w = scales[:, None] * q."""
    out_features = q.shape[0]
    return panels_of(q), _padded(scales, out_features), _padded(bias, out_features)


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor,
                 out_features: int) -> torch.Tensor:
    return torch.ops.loraxd_cpu.panel_mm(x.contiguous(), panels, bias, out_features)


def panel_linear_int8(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor, out_features: int) -> torch.Tensor:
    return torch.ops.loraxd_cpu.panel_mm_int8(x.contiguous(), panels, scales, bias,
                                              out_features)


def amx_usable(int8: bool = False) -> bool:
    """The library is loaded and this CPU and kernel give AMX-BF16 (`int8`: and AMX-INT8)."""
    return AMX_ENABLED and available() and torch.ops.loraxd_cpu.amx_usable(int8)


def amx_fits(weight: torch.Tensor) -> bool:
    """The AMX kernels take a weight [out, in] of bf16 or int8 whose out is a multiple of
    16 and in of a tile row (32 bf16 or 64 int8 values)."""
    group = AMX_K_GROUP.get(weight.dtype)
    out_features, in_features = weight.shape
    return (group is not None and amx_usable(weight.dtype == torch.int8)
            and out_features % AMX_TILE_N == 0 and in_features % (AMX_TILE_N * group) == 0)


def amx_tiles(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] in AMX's tile layout: [out/16, in/(16g), 16, 16, g] with g K values
    (2 bf16, 4 int8) of one output column side by side."""
    g = AMX_K_GROUP[weight.dtype]
    out_features, in_features = weight.shape
    tiles = weight.reshape(out_features // AMX_TILE_N, AMX_TILE_N,
                           in_features // (AMX_TILE_N * g), AMX_TILE_N, g)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


def amx_untile(tiles: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] that `amx_tiles` laid out."""
    nt, kt, _, _, g = tiles.shape
    return tiles.permute(0, 3, 1, 2, 4).reshape(nt * AMX_TILE_N, kt * AMX_TILE_N * g)


def _fp32_bias(bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return torch.zeros(out_features) if bias is None else bias.float().contiguous()


def pack_amx(weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 tiles, fp32 bias [out]) of a bf16 weight [out, in] that `amx_fits`."""
    return amx_tiles(weight), _fp32_bias(bias, weight.shape[0])


def pack_amx_int8(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 tiles, fp32 scales, int32 column sums, fp32 bias) of w = scales[:, None] * q,
    q fitting the tiles (the kernel's unsigned inputs are offset; the sums take it back)."""
    return (amx_tiles(q), scales.float().contiguous(), q.sum(1, dtype=torch.int32),
            _fp32_bias(bias, q.shape[0]))


def amx_linear(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x bf16 [rows, in] @ W.T + bias (fp32 [out]) with W in bf16 tiles."""
    return torch.ops.loraxd_cpu.amx_mm(x.contiguous(), tiles, bias)


def amx_linear_int8(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
                    colsums: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (fp32 or bf16) @ (scales[:, None] * q).T + bias with q in int8 tiles; y in x's dtype."""
    return torch.ops.loraxd_cpu.amx_mm_int8(x.contiguous(), tiles, scales, colsums, bias)
