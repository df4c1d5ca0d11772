"""Real worker processes without the daemon: this plays the supervisor (typed options, one
process per rank) and the scheduler (a ROUTER socket; every message to every rank; rank 0's
answers), and offers `execute(step)` so that the unit tests' `Driver` can drive a group."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import zmq

from loraxd.protocol.codec import PROTOCOL_VERSION, decode_from_worker, encode, encode_options
from loraxd.protocol.worker import (AdapterLoaded, AdapterMerge, Hello, LoadAdapter, Ready,
                                    Shutdown, StepFailed, StepResult, WorkerError,
                                    WorkerOptions)
from tests.integration.daemon import free_port

TIMEOUT_S = 120.0


class WorkerGroup:
    def __init__(self, model_dir: Path, world_size: int, tmp: Path, *, block_size: int = 4,
                 max_batch_total_tokens: int = 512, device: str = "cpu",
                 dtype: str = "float32", quantize: str | None = None):
        self.world_size, self.block_size = world_size, block_size
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{tmp / 'workers.sock'}"
        self.sock.bind(endpoint)
        options = WorkerOptions(
            dtype=dtype, quantize=quantize, device=device, block_size=block_size,
            max_batch_total_tokens=max_batch_total_tokens, cuda_memory_fraction=1.0,
            max_batch_prefill_tokens=max_batch_total_tokens, num_blocks=0, num_threads=1,
            max_active_adapters=4, adapter_memory_bytes=1 << 28, max_lora_rank=16,
            max_adapter_bytes=1 << 28, master_addr="127.0.0.1",
            master_port=free_port() if world_size > 1 else 0,
            collective_timeout_s=TIMEOUT_S, log_level="warning",
            json_output=False, watermark_gamma=0.5, watermark_delta=2.0,
            kernel_dir=str(tmp / "kernels"), compile=False)
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "loraxd.worker.main", "--endpoint", endpoint,
             "--rank", str(rank), "--world-size", str(world_size), "--model-dir",
             str(model_dir), "--options", encode_options(options)])
            for rank in range(world_size)]
        self.ready: dict[int, Ready] = {}
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise
        self.num_blocks = self.ready[0].num_blocks

    def recv(self, timeout_s: float = TIMEOUT_S):
        """(rank, message); TimeoutError when nothing comes."""
        if not self.sock.poll(timeout_s * 1000):
            raise TimeoutError(f"no worker message in {timeout_s} s")
        identity, frame = self.sock.recv_multipart()
        return int(identity.split(b"-")[1]), decode_from_worker(frame)

    def send(self, msg) -> None:
        frame = encode(msg)
        for rank in range(self.world_size):
            self.sock.send_multipart([b"rank-%d" % rank, frame])

    def _handshake(self) -> None:
        while len(self.ready) < self.world_size:
            rank, msg = self.recv()
            if isinstance(msg, WorkerError):
                raise RuntimeError(msg.message)
            assert isinstance(msg, (Hello, Ready)), msg
            if isinstance(msg, Hello):
                assert msg.protocol_version == PROTOCOL_VERSION
            else:
                self.ready[rank] = msg

    def load_adapter(self, slot: int, path: str = "", merge: AdapterMerge | None = None):
        """Every rank must answer; returns their errors (None each on success)."""
        self.send(LoadAdapter(slot, f"key-{slot}", path, merge))
        errors = {}
        while len(errors) < self.world_size:
            rank, msg = self.recv()
            assert isinstance(msg, AdapterLoaded) and msg.slot == slot, msg
            errors[rank] = msg.error
        return errors

    def execute(self, step, lora=None):
        """What `ModelRunner.execute` returns, from rank 0's StepResult (Driver's seam)."""
        assert lora is None
        self.send(step)
        rank, msg = self.recv()
        assert rank == 0 and isinstance(msg, StepResult), (rank, msg)  # only rank 0 answers
        assert msg.step_id == step.step_id
        return [*msg.outputs, *msg.failed]

    def expect_failure(self, step) -> StepFailed | WorkerError:
        self.send(step)
        _, msg = self.recv()
        assert isinstance(msg, (StepFailed, WorkerError)), msg
        return msg

    def close(self) -> None:
        try:
            self.send(Shutdown())
        except zmq.ZMQError:
            pass
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close(0)
        self.ctx.term()
