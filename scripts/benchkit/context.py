"""What every system is started with: the same model, adapters and threads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BenchContext:
    model_dir: Path
    adapter_root: Path  # one subfolder per adapter name
    adapter_names: list[str]
    threads: int
    dtype: str
    work_dir: Path  # this run's logs and scratch
    cache_dir: Path  # conversions kept between runs
    peer_options: dict = field(default_factory=dict)  # the peers' options, by name

    def adapter_dirs(self) -> list[Path]:
        return [self.adapter_root / name for name in self.adapter_names]
