"""The scheduler's end of the worker socket, against a real DEALER: the handshake's checks,
and a read cancelled halfway (the step loop replacing its workers) losing no frame."""
from __future__ import annotations

import asyncio

import pytest
import zmq

from loraxd.engine.worker_client import WorkerClient, WorkerLost
from loraxd.protocol.codec import PROTOCOL_VERSION, encode
from loraxd.protocol.worker import Hello, Pong, Ready

READY = Ready(0, 64, 4, 128, [0], 64, "float32", "cpu", "LlamaForCausalLM")


@pytest.fixture
async def pair(tmp_path):
    client = WorkerClient(f"ipc://{tmp_path / 'workers.sock'}", world_size=1)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"rank-0")
    dealer.connect(client.endpoint)
    yield client, dealer
    dealer.close(0)
    ctx.term()
    client.close()


async def test_a_worker_of_another_group_size_is_refused(pair):
    client, dealer = pair
    dealer.send(encode(Hello(PROTOCOL_VERSION, 0, 2, 123)))
    with pytest.raises(WorkerLost, match="says it is rank 0 of 2 from the socket of rank 0 of 1"):
        await asyncio.wait_for(client.handshake(), 5)


async def test_a_cancelled_read_leaves_the_next_frame_to_the_next_reader(pair):
    client, dealer = pair
    reader = asyncio.ensure_future(client.recv())
    await asyncio.sleep(0.05)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    dealer.send(encode(Hello(PROTOCOL_VERSION, 0, 1, 123)))
    dealer.send(encode(READY))
    assert await asyncio.wait_for(client.handshake(), 5) == READY
    dealer.send(encode(Pong(0, 7)))
    assert await asyncio.wait_for(client.recv(), 5) == (0, Pong(0, 7))
