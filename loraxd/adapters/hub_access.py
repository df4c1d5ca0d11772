"""Which hub adapters are private, and which request tokens may use them.

An adapter is private when the server's own hub credentials (anonymous, or the operator's
HF_TOKEN) cannot see it, so that its download needed the request's token. Every request for
a private adapter must bring a token the hub accepts for that repository: a token verified in
the last ten minutes is accepted from memory (by its SHA-256, never the token itself), any
other is checked with the hub. The verdict (private or public) is kept on disk next to the
adapter cache so that it survives a restart; tokens are kept in memory only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from loraxd.adapters.errors import AdapterFetchError

log = logging.getLogger(__name__)

TOKEN_TTL_S = 600.0
_MAX_TOKENS_PER_ADAPTER = 256
_PROBE_TIMEOUT_S = 10.0
_REFUSED = "this adapter is private and this request's token is not authorised"


def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub could not be reached" for the installed hub client
    (huggingface_hub 1.x speaks HTTP through httpx, 2.x through httpx2)."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for name in ("httpx", "httpx2"):
        client = sys.modules.get(name)
        if client is not None:
            errors.append(client.TransportError)
    return tuple(errors)


def probe_hub_access(adapter_id: str, token: str | None) -> bool | None:
    """Whether `token` (None: the server's own credentials) may download the repository;
    None when the hub cannot tell (unreachable or failing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    api = HfApi()
    try:
        info = api.model_info(adapter_id, token=token, timeout=_PROBE_TIMEOUT_S)
        if getattr(info, "gated", False):  # a gated repo's card is public, its files are not
            api.auth_check(adapter_id, token=token)
        return True
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if isinstance(exc, RepositoryNotFoundError) or status in (401, 403, 404):
            return False
        log.warning("hub access check for %s failed: HTTP %s", adapter_id, status)
        return None
    except network_errors() as exc:
        log.warning("hub access check for %s: the hub is unreachable (%s)", adapter_id,
                    type(exc).__name__)
        return None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class HubAccess:
    """Thread-safe: the engine calls `check` and the fetch path from pool threads."""

    def __init__(self, state_dir: Path, *,
                 probe: Callable[[str, str | None], bool | None] = probe_hub_access,
                 clock: Callable[[], float] = time.monotonic):
        self.state_dir = state_dir
        self._probe = probe
        self._clock = clock
        self._lock = threading.Lock()
        self._private: dict[str, bool] = {}
        self._verified: dict[str, dict[str, float]] = {}  # adapter_id -> {token sha256: when}

    # -- verdicts ----------------------------------------------------------------------------

    def is_private(self, adapter_id: str) -> bool | None:
        """True/False once known (this run or an earlier one); None for an unknown adapter."""
        with self._lock:
            if adapter_id in self._private:
                return self._private[adapter_id]
        private = self._load(adapter_id)
        if private is not None:
            with self._lock:
                private = self._private.setdefault(adapter_id, private)
        return private

    def on_downloaded(self, adapter_id: str, token: str | None) -> None:
        """A download just succeeded, with the request's `token` or (None) without."""
        if token is None:
            self._set(adapter_id, private=False, persist=True)
            return
        public = self._probe(adapter_id, None)
        # Unknown counts as private: the request's token is the only access we know works.
        self._set(adapter_id, private=public is not True, persist=True)
        if public is not True:
            self._remember(adapter_id, token_digest(token))

    def on_cached(self, adapter_id: str) -> None:
        """A cached adapter (downloaded by an earlier run or another tool) is being served."""
        if self.is_private(adapter_id) is not None:
            return
        public = self._probe(adapter_id, None)
        if public is None:
            log.warning("adapter %s is in the hub cache and its access cannot be checked "
                        "(hub unreachable): served as public", adapter_id)
            self._set(adapter_id, private=False, persist=False)
        else:
            self._set(adapter_id, private=not public, persist=True)

    # -- request tokens ----------------------------------------------------------------------

    def check(self, adapter_id: str, token: str | None) -> None:
        """Raise AdapterFetchError unless `token` may use `adapter_id`."""
        if not self.is_private(adapter_id):
            return
        if not token:
            raise AdapterFetchError("hub", adapter_id, f"{_REFUSED} (no token given)")
        digest = token_digest(token)
        with self._lock:
            verified_at = self._verified.get(adapter_id, {}).get(digest)
        if verified_at is not None and self._clock() - verified_at < TOKEN_TTL_S:
            return
        allowed = self._probe(adapter_id, token)
        if allowed:
            self._remember(adapter_id, digest)
            return
        if allowed is None and verified_at is not None:
            return  # the hub is down: a token it accepted before still counts
        why = " (the hub is unreachable to verify it)" if allowed is None else ""
        raise AdapterFetchError("hub", adapter_id, _REFUSED + why)

    def _remember(self, adapter_id: str, digest: str) -> None:
        with self._lock:
            tokens = self._verified.setdefault(adapter_id, {})
            tokens.pop(digest, None)
            tokens[digest] = self._clock()
            while len(tokens) > _MAX_TOKENS_PER_ADAPTER:
                del tokens[next(iter(tokens))]

    # -- persistence -------------------------------------------------------------------------

    def _set(self, adapter_id: str, *, private: bool, persist: bool) -> None:
        with self._lock:
            self._private[adapter_id] = private
        if persist:
            self._store(adapter_id, private)

    def _path(self, adapter_id: str) -> Path:
        return self.state_dir / (adapter_id.replace("/", "--") + ".json")

    def _load(self, adapter_id: str) -> bool | None:
        try:
            private = json.loads(self._path(adapter_id).read_text())["private"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return private if isinstance(private, bool) else None

    def _store(self, adapter_id: str, private: bool) -> None:
        tmp = None
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump({"adapter_id": adapter_id, "private": private}, f)
            os.replace(tmp, self._path(adapter_id))
            tmp = None
        except OSError as exc:
            log.warning("cannot record the access of adapter %s in %s: %s", adapter_id,
                        self.state_dir, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
