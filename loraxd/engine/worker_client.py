"""The scheduler's end of the worker socket: one ROUTER, one DEALER per rank."""
from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from loraxd.protocol.codec import PROTOCOL_VERSION, DecodeError, decode_from_worker, encode
from loraxd.protocol.worker import FromWorker, Hello, Ready, ToWorker, WorkerError

log = logging.getLogger(__name__)
_LAST_WORDS_S = 0.5  # how long to look for a WorkerError once its sender has exited


class WorkerLost(Exception):
    pass


class ModelUnsupported(WorkerLost):
    """A worker cannot run this model or setting: a configuration error, not a fault."""


def rank_identity(rank: int) -> bytes:
    return b"rank-%d" % rank


class WorkerClient:
    def __init__(self, endpoint: str, world_size: int):
        self.endpoint = endpoint
        self.world_size = world_size
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a missing rank raises
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted rank takes its name back
        self._sock.bind(endpoint)
        self._lost = asyncio.Event()
        self.ready_ranks: dict[int, Ready] = {}  # each rank's Ready, from the last handshake

    def mark_lost(self) -> None:
        """Called by the supervisor when a worker process exits: wakes every waiter."""
        self._lost.set()

    def reset(self) -> None:
        self._lost = asyncio.Event()

    async def recv(self) -> tuple[int, FromWorker]:
        """The next message from any rank; raises WorkerLost if a worker dies meanwhile."""
        recv = asyncio.ensure_future(self._sock.recv_multipart(copy=False))
        try:
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                done, _ = await asyncio.wait({recv, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
            if recv not in done:  # a dying worker may have said why just before it exited
                done, _ = await asyncio.wait({recv}, timeout=_LAST_WORDS_S)
            if recv not in done:
                raise WorkerLost("a worker process exited")
        except BaseException:
            recv.cancel()  # left pending, it would swallow the next frame (a new Hello)
            raise
        identity, payload = recv.result()
        try:
            msg = decode_from_worker(payload.bytes)
        except DecodeError as exc:
            raise WorkerLost(f"undecodable frame from {identity.bytes!r}: {exc}") from exc
        if isinstance(msg, WorkerError):
            error = ModelUnsupported if msg.unsupported else WorkerLost
            raise error(f"worker rank {msg.rank} failed: {msg.message}")
        return int(identity.bytes.split(b"-")[1]), msg

    async def broadcast(self, msg: ToWorker) -> None:
        frame = encode(msg)
        for rank in range(self.world_size):
            try:
                await self._sock.send_multipart([rank_identity(rank), frame], copy=False)
            except zmq.ZMQError as exc:
                raise WorkerLost(f"worker rank {rank} is not connected: {exc}") from exc

    async def handshake(self) -> Ready:
        """Wait for Hello then Ready from every rank; returns rank 0's Ready (every rank's
        stays in `ready_ranks`). The ranks must agree on the KV pages the scheduler
        hands out."""
        hello: set[int] = set()
        ready: dict[int, Ready] = {}
        self.ready_ranks = ready
        while len(ready) < self.world_size:
            rank, msg = await self.recv()
            if isinstance(msg, Hello):
                if msg.protocol_version != PROTOCOL_VERSION:
                    raise WorkerLost(f"worker rank {rank} speaks protocol {msg.protocol_version}"
                                     f", this daemon {PROTOCOL_VERSION}")
                if (msg.rank, msg.world_size) != (rank, self.world_size):
                    raise WorkerLost(f"a worker says it is rank {msg.rank} of "
                                     f"{msg.world_size} from the socket of rank {rank} of "
                                     f"{self.world_size}")
                hello.add(rank)
            elif isinstance(msg, Ready) and rank in hello:
                ready[rank] = msg
            else:
                log.warning("unexpected %s from rank %d during handshake", type(msg).__name__,
                            rank)
        pages = {(r.num_blocks, r.block_size) for r in ready.values()}
        if len(pages) > 1:
            raise WorkerLost(f"the ranks disagree on the KV cache pages: {sorted(pages)}")
        return ready[0]

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()
