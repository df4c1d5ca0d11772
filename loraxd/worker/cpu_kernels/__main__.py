"""`python -m loraxd.worker.cpu_kernels`: build the CPU kernels under the environment's
prefix (set-up runs it), or say why this machine goes without them."""
from loraxd.worker import cpu_kernels

reason = cpu_kernels.enable()
print(f"CPU kernels: {cpu_kernels.library_path()}" if reason is None
      else f"CPU kernels not built: {reason}; fp32 runs on oneDNN and SDPA instead")
