"""systemd's watchdog, fed only while the engine's heartbeat is fresh.

WATCHDOG=1 goes out every quarter of WatchdogSec= as long as no step has waited for the
workers longer than half of it. A hung worker (stopped, deadlocked, stuck in a driver call)
leaves its step waiting, the pings stop, and systemd restarts the service. While idle no
step runs, so each tick that finds no step done lately sends a one-token probe through the
engine: a hung worker is found whether or not anyone is asking for tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from loraxd.daemon.notify import sd_notify

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, engine: Any, interval_s: float):
        self.engine = engine
        self.interval_s = interval_s
        self.tick_s = interval_s / 4
        self.stale_after_s = interval_s / 2
        self._probe: asyncio.Task | None = None
        self._stale = False

    def fresh(self) -> bool:
        return self.engine.stalled_for() < self.stale_after_s

    def tick(self) -> bool:
        """One round: ping when fresh; True when it pinged."""
        if self.fresh():
            if self._stale:
                log.warning("the engine's heartbeat is back; watchdog pings resume")
                self._stale = False
            sd_notify("WATCHDOG=1")
            self._start_probe()
            return True
        if not self._stale:
            log.error("the engine's step has waited %.1f s for the workers: no more watchdog "
                      "pings, systemd restarts loraxd unless the step ends within %.0f s",
                      self.engine.stalled_for(), self.interval_s)
            self._stale = True
        return False

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._run_probe(),
                                                                 name="watchdog-probe")

    async def _run_probe(self) -> None:
        try:
            await self.engine.health()  # a one-token step unless a step finished just now
        except Exception:  # noqa: BLE001 - the heartbeat, not the probe's answer, decides
            log.debug("watchdog probe failed", exc_info=True)

    async def run(self) -> None:
        log.info("systemd watchdog: %.1f s; pinging every %.1f s while steps finish within "
                 "%.1f s", self.interval_s, self.tick_s, self.stale_after_s)
        try:
            while True:
                self.tick()
                await asyncio.sleep(self.tick_s)
        finally:
            if self._probe is not None:
                self._probe.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._probe
