"""`python -m loraxd.worker.cpu_kernels`: build the panel kernel under the environment's
prefix (set-up runs it), or say why this machine goes without it."""
from loraxd.worker import cpu_kernels

reason = cpu_kernels.enable()
print(f"panel kernel: {cpu_kernels.library_path()}" if reason is None
      else f"panel kernel not built: {reason}; fp32 linears will use oneDNN")
