"""A fake worker socket for engine tests: no processes, no torch.

It answers as one rank would: a Pong to each Ping, AdapterLoaded to each LoadAdapter, and
to each Step what `answer(step)` puts in the inbox (nothing, for a hung worker). `sent`
keeps every message but the pings, in order."""
from __future__ import annotations

import asyncio

from loraxd.protocol.worker import (AdapterLoaded, LoadAdapter, Ping, Pong, SeqOutput, Step,
                                    StepResult)


class FakeWorkerSocket:
    world_size = 1

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.loads: list[LoadAdapter] = []
        self.pings = 0
        self.sent: list = []

    async def broadcast(self, msg):
        if isinstance(msg, Ping):
            self.pings += 1
            self.inbox.put_nowait((0, Pong(0, msg.seq)))
            return
        self.sent.append(msg)
        if isinstance(msg, LoadAdapter):
            self.loads.append(msg)
            self.inbox.put_nowait((0, AdapterLoaded(msg.slot, msg.adapter_key, None)))
        elif isinstance(msg, Step):
            self.answer(msg)

    def answer(self, step: Step) -> None:
        """An 'x' for every sequence of the step."""
        outs = [SeqOutput(i, ord("x"), -0.1) for i in step_ids(step)]
        self.inbox.put_nowait((0, StepResult(step.step_id, outs, 0.0)))

    async def recv(self):
        return await self.inbox.get()


def step_ids(step: Step) -> list[int]:
    return [n.req_id for n in step.new_seqs] + list(step.decode_ids)
