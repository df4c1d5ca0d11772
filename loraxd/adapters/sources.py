"""Turn an adapter reference (source, adapter_id, api_token) into a local PEFT adapter directory.

Every function here blocks (disk, network); the engine calls them through a thread pool.

- `local`: a name or relative path inside one of `local_adapter_dirs` (first match wins), or
  an absolute path inside one of them; nothing that escapes them after resolving `..` and
  symlinks.
- `hub`: `huggingface_hub.snapshot_download`, the cache first (works offline); see hub.py.
- `s3`: every adapter file under `s3://bucket/prefix/`, cached under `<cache_dir>/adapters/s3`;
  see s3.py.
- `pbase`: refused; loraxd does not talk to Predibase.

`lookup()` finds an adapter without the network (None: it needs `fetch()`), so that the
engine can run lookups and downloads in separate thread pools. Every file to be read must
resolve inside its source's directories (the local adapter dirs, the hub cache, the S3 cache);
`roots(source)` lists them for the worker, which checks each file again as it reads it. Downloads
(hub and S3) live in a disk cache with a size cap (disk_cache.py).

`authorize()` runs before every request for an adapter: a hub adapter that needed the
request's token to download is private, and each request must bring a token the hub accepts
for it (LoRAX serves a private adapter to anyone after one authorised download).
"""
from __future__ import annotations

import os
from pathlib import Path

from loraxd.adapters.disk_cache import DiskCache
from loraxd.adapters.errors import AdapterFetchError, check_adapter_dir
from loraxd.adapters.hub import HubSource, check_repo_id
from loraxd.adapters.s3 import S3Source, parse_s3_id

__all__ = ["AdapterFetchError", "AdapterSources"]

_PBASE_REFUSAL = "adapter source 'pbase' is not supported by loraxd; use hub, local or s3"


class AdapterSources:
    def __init__(self, *, local_adapter_dirs: tuple[str, ...], cache_dir: str,
                 hub_cache: str | None, cache_bytes: int | None = None,
                 max_adapter_bytes: int | None = None):
        self.local_adapter_dirs = tuple(local_adapter_dirs)
        adapters_dir = Path(cache_dir) / "adapters"
        self.hub = HubSource(hub_cache=hub_cache, access_dir=adapters_dir / "hub-access")
        self.s3 = S3Source(cache_root=adapters_dir / "s3", max_adapter_bytes=max_adapter_bytes)
        self.disk_cache = DiskCache(cache_bytes, adapters_dir / "disk-cache.json")

    def roots(self, source: str) -> list[str]:
        """The directories a file of an adapter from `source` may resolve into, resolved."""
        dirs = {"local": self.local_adapter_dirs, "hub": (self.hub.root,),
                "s3": (self.s3.cache_root,)}.get(source, ())
        return [os.path.realpath(os.path.expanduser(d)) for d in dirs]

    def lookup(self, source: str, adapter_id: str, api_token: str | None) -> Path | None:
        """The adapter's local directory when no network is needed, else None (blocking on
        the disk only)."""
        return self._get(source, adapter_id, api_token, download=False)

    def fetch(self, source: str, adapter_id: str, api_token: str | None) -> Path:
        """The adapter's local directory, downloading it first if needed (blocking)."""
        return self._get(source, adapter_id, api_token, download=True)

    def cache_entry(self, source: str, adapter_id: str) -> Path | None:
        """The disk-cache directory a hub or S3 adapter is downloaded into; None for local
        adapters and ids that are not valid."""
        try:
            if source == "hub":
                check_repo_id(adapter_id)
                return self.hub.entry(adapter_id)
            if source == "s3":
                return self.s3.entry(*parse_s3_id(adapter_id))
        except AdapterFetchError:
            pass
        return None

    def _get(self, source: str, adapter_id: str, api_token: str | None, *,
             download: bool) -> Path | None:
        _check_id(source, adapter_id)
        if source == "local":
            return find_local(self.local_adapter_dirs, adapter_id)
        if source == "pbase":
            raise AdapterFetchError(source, adapter_id, _PBASE_REFUSAL)
        if source not in ("hub", "s3"):
            raise AdapterFetchError(source, adapter_id,
                                    "unknown adapter source; use hub, local or s3")
        if source == "hub":
            check_repo_id(adapter_id)
            entry = self.hub.entry(adapter_id)
        else:
            entry = self.s3.entry(*parse_s3_id(adapter_id))
        with self.disk_cache.hold(entry):
            if source == "hub":
                path = (self.hub.fetch(adapter_id, api_token) if download
                        else self.hub.lookup(adapter_id))
            else:
                path = self.s3.fetch(adapter_id) if download else self.s3.lookup(adapter_id)
            if path is not None:
                self.disk_cache.record(entry)
        return path

    def authorize(self, source: str, adapter_id: str, api_token: str | None) -> None:
        """Raise AdapterFetchError when `api_token` may not use this adapter (blocking).

        Only private hub adapters are checked; local and s3 adapters are the operator's.
        An adapter this server has not fetched yet passes: its fetch decides.
        """
        if source == "hub":
            self.hub.authorize(adapter_id, api_token)
        elif source == "pbase":
            raise AdapterFetchError(source, adapter_id, _PBASE_REFUSAL)
        elif source not in ("local", "s3"):
            raise AdapterFetchError(source, adapter_id,
                                    "unknown adapter source; use hub, local or s3")


def adapter_sources(config) -> AdapterSources:
    """The sources a daemon with `config` serves adapters from."""
    a = config.adapters
    return AdapterSources(local_adapter_dirs=a.local_adapter_dirs,
                          cache_dir=config.paths.cache_dir,
                          hub_cache=config.model.huggingface_hub_cache,
                          cache_bytes=a.adapter_cache_bytes,
                          max_adapter_bytes=a.max_adapter_bytes)


def _check_id(source: str, adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not adapter_id.strip():
        raise AdapterFetchError(source, str(adapter_id), "the adapter id is empty")
    if "\x00" in adapter_id:
        raise AdapterFetchError(source, adapter_id, "the adapter id contains a NUL byte")


def find_local(roots: tuple[str, ...], adapter_id: str) -> Path:
    """The first adapter directory named `adapter_id` inside `roots`."""
    if not roots:
        raise AdapterFetchError("local", adapter_id,
                                "no local adapter directories are configured (local_adapter_dirs)")
    real_roots = [Path(root).expanduser().resolve() for root in roots]
    if Path(adapter_id).is_absolute():
        path = Path(adapter_id).resolve()
        if not any(path.is_relative_to(root) for root in real_roots):
            raise AdapterFetchError("local", adapter_id,
                                    "the path is outside the local adapter directories")
        return check_adapter_dir("local", adapter_id, path, real_roots)
    bare_dir = None
    for root in real_roots:
        path = (root / adapter_id).resolve()
        if not path.is_relative_to(root):
            raise AdapterFetchError("local", adapter_id,
                                    "the path escapes the local adapter directories")
        if (path / "adapter_config.json").is_file():
            return check_adapter_dir("local", adapter_id, path, real_roots)
        if bare_dir is None and path.is_dir():
            bare_dir = path
    if bare_dir is not None:
        return check_adapter_dir("local", adapter_id, bare_dir, real_roots)
    raise AdapterFetchError("local", adapter_id, "no such adapter in the local adapter directories")
