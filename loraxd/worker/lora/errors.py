"""The one error an adapter that loraxd cannot serve raises while it is read."""
from __future__ import annotations


class AdapterIncompatible(Exception):
    """The adapter can't be served by loraxd; `reason` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
