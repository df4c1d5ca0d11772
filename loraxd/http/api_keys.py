"""API keys: the keys file, read into hashed entries, and the check of a presented key.

The file is TOML, one table per key:

    [[keys]]
    name = "team-a"                      # shown in logs, never the key itself
    sha256 = "<hex sha256 of the key>"   # or key = "<the key>" in a file only its owner reads
    adapters = ["team-a/*", "shared-*"]  # glob patterns of adapter ids; "*": every adapter
    base_model = true                    # may it use the base model alone (default true)

Only SHA-256 digests are kept, also of plain keys; a presented key is hashed and compared
with every entry's digest in constant time, so neither the match nor its position shows.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

log = logging.getLogger(__name__)

CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"  # systemd's LoadCredential= directory
_CREDENTIALS_REF = re.compile(r"\$(\{CREDENTIALS_DIRECTORY\}|CREDENTIALS_DIRECTORY\b)")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_ENTRY_FIELDS = {"name", "sha256", "key", "adapters", "base_model"}


class KeysFileError(Exception):
    """The keys file cannot be used; the message names the file and the reason."""


def digest(key: str) -> bytes:
    # surrogatepass: any str hashes; a header's bytes decode to the same str as the file's key
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    adapters: tuple[str, ...]  # glob patterns
    base_model: bool = True

    def may_use(self, adapter_id: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter_id, pattern) for pattern in self.adapters)


def expand_path(path: str, environ: Mapping[str, str]) -> str:
    """`$CREDENTIALS_DIRECTORY/<name>` names a systemd credential of this service start."""
    if not _CREDENTIALS_REF.search(path):
        return path
    directory = environ.get(CREDENTIALS_VARIABLE)
    if not directory:
        raise KeysFileError(f"{path}: ${CREDENTIALS_VARIABLE} is not set (the service has no "
                            "LoadCredential=)")
    return _CREDENTIALS_REF.sub(lambda _: directory, path)


def read_keys_file(path: str) -> tuple[ApiKey, ...]:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = tomllib.load(f)
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(data) - {"keys"}
    if unknown:
        raise KeysFileError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}; "
                            "keys are [[keys]] tables")
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: keys must be [[keys]] tables")
    keys = tuple(_entry(path, i, raw) for i, raw in enumerate(entries))
    if any("key" in raw for raw in entries) and stat.S_IMODE(mode) & 0o077:
        raise KeysFileError(f"{path}: holds plain keys but its mode is "
                            f"{stat.S_IMODE(mode):04o}; make it 0600 or store sha256 digests")
    _check_unique(path, keys)
    return keys


def _entry(path: str, i: int, raw: Any) -> ApiKey:
    where = f"{path}: keys[{i}]"
    if not isinstance(raw, dict):
        raise KeysFileError(f"{where}: must be a table")
    unknown = set(raw) - _ENTRY_FIELDS
    if unknown:
        raise KeysFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise KeysFileError(f"{where}: name must be a non-empty string")
    where = f"{path}: key {name!r}"
    if ("sha256" in raw) == ("key" in raw):
        raise KeysFileError(f"{where}: give exactly one of sha256 and key")
    if "sha256" in raw:
        hex_digest = raw["sha256"]
        if not isinstance(hex_digest, str) or not _HEX_SHA256.fullmatch(hex_digest):
            raise KeysFileError(f"{where}: sha256 must be 64 hex digits")
        key_digest = bytes.fromhex(hex_digest)
    else:
        if not isinstance(raw["key"], str) or not raw["key"]:
            raise KeysFileError(f"{where}: key must be a non-empty string")
        key_digest = digest(raw["key"])
    adapters = raw.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise KeysFileError(f"{where}: adapters must be a list of glob patterns")
    base_model = raw.get("base_model", True)
    if not isinstance(base_model, bool):
        raise KeysFileError(f"{where}: base_model must be true or false")
    return ApiKey(name=name, digest=key_digest, adapters=tuple(adapters), base_model=base_model)


def _check_unique(path: str, keys: tuple[ApiKey, ...]) -> None:
    names, digests = set(), set()
    for key in keys:
        if key.name in names:
            raise KeysFileError(f"{path}: two keys are named {key.name!r}")
        if key.digest in digests:
            raise KeysFileError(f"{path}: key {key.name!r} is the same key as another entry")
        names.add(key.name)
        digests.add(key.digest)


class KeyRing:
    """The keys in force. Off (`enabled` False) when no file is configured."""

    def __init__(self, path: str | None, environ: Mapping[str, str] | None = None):
        self.path = path
        self.environ = os.environ if environ is None else environ
        self.keys: tuple[ApiKey, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> None:
        """Read the file; raise KeysFileError (at startup, a bad file stops the daemon)."""
        if self.path is not None:
            self.keys = read_keys_file(expand_path(self.path, self.environ))

    def reload(self) -> bool:
        """Read the file again; a file that fails keeps the keys in force (logged)."""
        try:
            self.load()
        except KeysFileError as exc:
            log.error("API keys not reloaded, the %d loaded ones stay: %s", len(self.keys), exc)
            return False
        if self.enabled:
            log.info("API keys reloaded: %d key(s)", len(self.keys))
        return True

    def check(self, presented: str | None) -> ApiKey | None:
        """The entry whose key this is, else None; every entry is compared, in constant time."""
        if presented is None:
            return None
        wanted = digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found
