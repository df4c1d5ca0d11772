"""Host-to-device copies that never make the host wait for the device.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory and then
synchronises the stream: one stall per index tensor per step. Here a host tensor is staged in
pinned memory and copied asynchronously; torch's caching host allocator keeps the staging
buffer alive until the copy has run. On a CPU these are the plain calls they replace.

`SideStreamUploads` moves adapter weights into the slot pool on a CUDA side stream, so an
upload queues behind no compute work and the next step waits for it on the device, not the
host.
"""
from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`; on CUDA without a host sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def tensor_on(values, device: str | torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), without a host sync on CUDA."""
    return to_device(torch.tensor(values, dtype=dtype), device)


class SideStreamUploads:
    """Copies into device tensors, on CUDA from pinned memory on a side stream.

    `with uploads:` brackets one adapter's copies: the side stream first waits for the work
    already queued on the compute stream (it may still read the slot being overwritten), and
    records an event at the end; `ready()` makes the compute stream wait for that event
    before the step that reads the slot. Elsewhere every call is a plain copy."""

    def __init__(self, device: str | torch.device):
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._done: torch.cuda.Event | None = None

    def __enter__(self) -> SideStreamUploads:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self._done = torch.cuda.Event()
            self._done.record(self.stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (a device tensor or view) = src (a host tensor of its shape)."""
        if self.stream is None:
            dst.copy_(src)
            return
        staged = src.contiguous().pin_memory() if src.device.type == "cpu" else src
        with torch.cuda.stream(self.stream):
            dst.copy_(staged, non_blocking=True)

    def zero(self, dst: torch.Tensor) -> None:
        if self.stream is None:
            dst.zero_()
            return
        with torch.cuda.stream(self.stream):
            dst.zero_()

    def ready(self) -> None:
        """The compute stream waits (on the device) for the last upload."""
        if self._done is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self._done)
            self._done = None
