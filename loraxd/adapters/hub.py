"""Hub adapters: the hub cache first (works offline), then a download; hub errors in words.

The request's token is used for the download; without one, the server's own credentials
(anonymous, or the operator's HF_TOKEN, read by huggingface_hub). Who may use a private
adapter afterwards is hub_access.py's business.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from loraxd.adapters.errors import ADAPTER_FILES, CONFIG_FILE, AdapterFetchError, check_adapter_dir
from loraxd.adapters.hub_access import HubAccess, network_errors

log = logging.getLogger(__name__)

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_UNREACHABLE = "the hub is unreachable and the adapter is not cached"


class HubSource:
    def __init__(self, *, hub_cache: str | None, access_dir: Path):
        self.hub_cache = hub_cache
        self.access = HubAccess(access_dir)

    @property
    def root(self) -> str:
        """The hub cache directory (huggingface_hub's own when none is configured)."""
        if self.hub_cache:
            return self.hub_cache
        from huggingface_hub import constants
        return constants.HF_HUB_CACHE

    def entry(self, adapter_id: str) -> Path:
        """The repository's folder in the hub cache (its snapshots and blobs)."""
        return Path(self.root) / ("models--" + adapter_id.replace("/", "--"))

    def lookup(self, adapter_id: str) -> Path | None:
        """The cached adapter when its access is already known, so that serving it needs no
        network; else None."""
        check_repo_id(adapter_id)
        if self.access.is_private(adapter_id) is None:
            return None
        cached = self._cached(adapter_id)
        return None if cached is None else self._checked(adapter_id, cached)

    def fetch(self, adapter_id: str, api_token: str | None) -> Path:
        check_repo_id(adapter_id)
        token = api_token or None
        cached = self._cached(adapter_id)
        if cached is not None:
            self.access.on_cached(adapter_id)
            return self._checked(adapter_id, cached)
        path, used_token = self._download(adapter_id, token)
        path = self._checked(adapter_id, path)
        self.access.on_downloaded(adapter_id, token if used_token else None)
        return path

    def _checked(self, adapter_id: str, path: Path) -> Path:
        return check_adapter_dir("hub", adapter_id, path, roots=(self.root,))

    def authorize(self, adapter_id: str, api_token: str | None) -> None:
        check_repo_id(adapter_id)
        self.access.check(adapter_id, api_token or None)

    def _snapshot(self, adapter_id: str, token: str | None, *, local_files_only: bool) -> Path:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(adapter_id, token=token, cache_dir=self.hub_cache,
                                      local_files_only=local_files_only,
                                      allow_patterns=list(ADAPTER_FILES)))

    def _cached(self, adapter_id: str) -> Path | None:
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            path = self._snapshot(adapter_id, None, local_files_only=True)
        except LocalEntryNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - an unreadable cache entry is a miss
            log.warning("hub cache entry of %s unusable: %s", adapter_id, exc)
            return None
        return path if (path / CONFIG_FILE).is_file() else None

    def _download(self, adapter_id: str, token: str | None) -> tuple[Path, bool]:
        """(snapshot dir, whether the request's token was used)."""
        try:
            return self._snapshot(adapter_id, token, local_files_only=False), token is not None
        except Exception as exc:  # noqa: BLE001 - every failure becomes an AdapterFetchError
            if token is None or not _bad_credentials(exc):
                raise _hub_error(adapter_id, exc, token) from exc
            rejected = exc
        # The hub rejected the token itself (e.g. an API key of this server sent as a Bearer
        # token): fetch what the server's own credentials can see; a private repo stays shut.
        try:
            return self._snapshot(adapter_id, None, local_files_only=False), False
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(adapter_id, rejected, token) from exc


def check_repo_id(adapter_id: str) -> None:
    if (not _REPO_ID.fullmatch(adapter_id) or "--" in adapter_id or ".." in adapter_id
            or adapter_id.endswith(".git")):
        raise AdapterFetchError("hub", adapter_id, "not a hub repository id (expected "
                                "'namespace/name' or 'name': letters, digits, '-', '_', '.')")


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _bad_credentials(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    return (isinstance(exc, HfHubHTTPError) and not isinstance(exc, RepositoryNotFoundError)
            and _status(exc) == 401)


def _hub_error(adapter_id: str, exc: BaseException, token: str | None) -> AdapterFetchError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    who = ("this request's token" if token
           else "the server's own credentials (the request gave no token)")
    denied = isinstance(exc, (GatedRepoError, RepositoryNotFoundError)) or (
        isinstance(exc, HfHubHTTPError) and _status(exc) in (401, 403))
    if isinstance(exc, (LocalEntryNotFoundError, *network_errors())):
        offline = " (offline mode: HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = _UNREACHABLE + offline
    elif isinstance(exc, GatedRepoError):
        reason = f"the repository is gated on the hub and {who} may not access it"
    elif isinstance(exc, RepositoryNotFoundError):
        reason = f"repository not found on the hub, or it is private and {who} may not access it"
    elif isinstance(exc, RevisionNotFoundError):
        reason = "the repository has no 'main' revision on the hub"
    elif isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        reason = {401: "unauthorized: the hub rejected the token",
                  403: "forbidden: the token may not read this repository"}.get(
                      status, f"the hub answered HTTP {status}")
    elif isinstance(exc, OSError):
        reason = f"cannot write the hub cache: {exc.strerror or exc}"
    else:
        reason = f"hub download failed: {type(exc).__name__}: {exc}"
    return AdapterFetchError("hub", adapter_id, reason, denied=denied)
