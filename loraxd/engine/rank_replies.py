"""Join the ranks' answers to one LoadAdapter into one.

Every tensor-parallel rank installs its part of an adapter on its own, between its steps;
a slot may be used only once every rank holds its part, or one rank would compute with
another adapter's weights. So a slot counts as loaded when all ranks have answered, and as
failed if any rank failed (the first error is the one reported). An adapter is in host
memory when every rank's LRU holds it.
"""
from __future__ import annotations

from loraxd.protocol.worker import AdapterLoaded


class AdapterReplies:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._pending: dict[tuple[int, str], list[AdapterLoaded]] = {}

    def add(self, msg: AdapterLoaded) -> AdapterLoaded | None:
        """The joined answer once the last rank has answered; None before."""
        if self.world_size == 1:
            return msg
        key = (msg.slot, msg.adapter_key)
        replies = self._pending.setdefault(key, [])
        replies.append(msg)
        if len(replies) < self.world_size:
            return None
        del self._pending[key]
        error = next((r.error for r in replies if r.error is not None), None)
        held = set.intersection(*(set(r.host_cached) for r in replies))  # by every rank
        return AdapterLoaded(msg.slot, msg.adapter_key, error,
                             [k for k in msg.host_cached if k in held])

    def reset(self) -> None:
        """The group was replaced: answers from the old one will never complete."""
        self._pending.clear()
