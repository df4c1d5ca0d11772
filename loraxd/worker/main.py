"""A worker process: one per tensor-parallel rank (rank i on GPU i; one on a CPU).
Started by the supervisor as `python -m loraxd.worker.main --endpoint ipc://… --rank R
--world-size N --model-dir DIR --options JSON` (a `WorkerOptions`); it never forks from the
event-loop process.

Life: title, signals, connect, Hello, join the tensor-parallel group, load this rank's
shard, Ready, then answer messages until Shutdown or until the supervisor goes away.
Messages are handled one at a time, so a SetLogLevel takes effect between two steps, and a
Ping is answered as soon as no step runs.

Every rank gets every message from the scheduler's socket (one frame, encoded once, sent to
each rank), so ranks wait between steps in a socket poll, never in a collective, and a
Shutdown reaches each one even when a peer is dead. Only rank 0 answers a step. In a group
a step that fails inside the forward pass is fatal: the peers may be waiting in a
collective it never reached, so the rank reports and exits, and the supervisor replaces
the group.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
import traceback

import zmq

from loraxd.logs import configure as configure_logging
from loraxd.logs import set_level
from loraxd.protocol.codec import (PROTOCOL_VERSION, DecodeError, decode_options,
                                   decode_to_worker, encode)
from loraxd.protocol.worker import (
    FrameRejected,
    Hello,
    LoadAdapter,
    Ping,
    Pong,
    Ready,
    SeqFailure,
    SeqOutput,
    SetLogLevel,
    Shutdown,
    Step,
    StepFailed,
    StepResult,
    WorkerError,
    WorkerOptions,
)
from loraxd.worker.adapter_loader import AdapterLoader

log = logging.getLogger("loraxd.worker")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies, so no worker is orphaned: a
    SIGKILL, because it ends a stopped or hung worker too and its state is worthless alone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loraxd-worker")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--options", required=True, help="JSON: a WorkerOptions")
    return p.parse_args(argv)


class GroupBroken(Exception):
    """A step failed on a rank of a tensor-parallel group: the group must be replaced."""


class Worker:
    def __init__(self, runner, sock: zmq.Socket, rank: int, adapters: AdapterLoader,
                 world_size: int = 1):
        self.runner = runner
        self.sock = sock
        self.rank = rank
        self.world_size = world_size
        self.adapters = adapters
        self.handlers = {Step: self.on_step, LoadAdapter: self.on_load_adapter,
                         Ping: self.on_ping, SetLogLevel: self.on_set_log_level}

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.adapters.fileno(), zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self.adapters.fileno() in events:
                for reply in self.adapters.install_ready():
                    self._send(reply)
            if self.sock not in events:
                continue
            try:
                msg = decode_to_worker(self.sock.recv(copy=False).bytes)
            except DecodeError as exc:
                log.error("rejecting an undecodable frame: %s", exc)
                self._send(FrameRejected(self.rank, str(exc)))
                continue
            if isinstance(msg, Shutdown):
                return
            self._send(self.handlers[type(msg)](msg))

    def _send(self, reply) -> None:
        if reply is None or (self.rank != 0 and isinstance(reply, (StepResult, StepFailed))):
            return
        self.sock.send(encode(reply), copy=False)

    def on_step(self, step: Step):
        # every step goes to the runner, even one with no new or decoding sequence: it may
        # carry a prompt's next slice, pages to zero, sequences to forget
        start = time.perf_counter()
        from loraxd.worker.runner import StepRejected
        try:
            results = self.runner.execute(step)
        except Exception as exc:  # noqa: BLE001 - a bad step fails its requests, not the worker
            if self.world_size > 1 and not isinstance(exc, StepRejected):
                raise GroupBroken(f"step {step.step_id} failed on rank {self.rank}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            log.exception("step %d failed", step.step_id)
            ids = ([s.req_id for s in step.new_seqs] + list(step.prefill_chunks)
                   + list(step.decode_ids))
            self.runner.forget(ids)
            return StepFailed(step.step_id, ids, f"{type(exc).__name__}: {exc}")
        outputs = [r for r in results if isinstance(r, SeqOutput)]
        failed = [r for r in results if isinstance(r, SeqFailure)]
        for failure in failed:
            log.warning("request %d failed alone: %s", failure.req_id, failure.message)
        elapsed = time.perf_counter() - start
        log.debug("step %d: %d prefilled, %d decoded, %d failed in %.1f ms", step.step_id,
                  len(step.new_seqs), len(step.decode_ids), len(failed), 1000 * elapsed)
        return StepResult(step.step_id, outputs, elapsed, failed)

    def on_ping(self, msg: Ping) -> Pong:
        return Pong(self.rank, msg.seq)

    def on_load_adapter(self, msg: LoadAdapter) -> None:
        self.adapters.submit(msg)  # answered by AdapterLoaded once installed

    def on_set_log_level(self, msg: SetLogLevel) -> None:
        set_level(msg.level)
        log.info("log level set to %s", msg.level)


def adapter_limits(options: WorkerOptions):
    """What an adapter may be (see loraxd.worker.lora.limits), from the supervisor's options."""
    from loraxd.worker.lora.limits import AdapterLimits
    return AdapterLimits(max_rank=options.max_lora_rank, max_bytes=options.max_adapter_bytes)


def _device(options: WorkerOptions, rank: int):
    """Rank i runs on CUDA device i; `auto` is CUDA when there is one."""
    import torch
    kind = options.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind != "cuda":
        return torch.device(kind)
    from loraxd.worker.models import UnsupportedModel
    if not torch.cuda.is_available():
        raise UnsupportedModel(f"device cuda, but this torch ({torch.__version__}) sees no "
                               "CUDA device: install a CUDA build of torch, or set device = "
                               "cpu")
    if rank >= torch.cuda.device_count():
        raise UnsupportedModel(f"rank {rank} needs CUDA device {rank}, but "
                               f"{torch.cuda.device_count()} are visible (num_shard)")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _enable_cpu_kernels(rank: int, options: WorkerOptions) -> None:
    from loraxd.worker import cpu_kernels
    reason = cpu_kernels.enable(options.kernel_dir)
    if reason is None:
        amx = "; bf16 and int8 linears on AMX" if cpu_kernels.amx_usable() else ""
        log.info("rank %d: CPU kernels from %s%s", rank, cpu_kernels.library_path(), amx)
    elif options.dtype == "float32" and options.quantize is None:
        log.warning("rank %d: fp32 linears on oneDNN and attention on SDPA, slower: %s",
                    rank, reason)


def _load(args: argparse.Namespace, options: WorkerOptions):
    """Join the group and load this rank's shard: (runner, tp)."""
    from loraxd.worker.distributed import init_tensor_parallel
    from loraxd.worker.runner import KvSizing, ModelRunner
    device = _device(options, args.rank)
    if device.type == "cpu":
        _enable_cpu_kernels(args.rank, options)
    tp = init_tensor_parallel(args.rank, args.world_size, device,
                              master_addr=options.master_addr, master_port=options.master_port,
                              timeout_s=options.collective_timeout_s)
    kv = KvSizing(memory_fraction=options.cuda_memory_fraction,
                  max_prefill_tokens=options.max_batch_prefill_tokens,
                  num_blocks=options.num_blocks)
    runner = ModelRunner(args.model_dir, dtype=options.dtype, device=str(device),
                         max_batch_total_tokens=options.max_batch_total_tokens or None,
                         block_size=options.block_size, num_threads=options.num_threads,
                         tp=tp, watermark_gamma=options.watermark_gamma,
                         watermark_delta=options.watermark_delta, kv=kv,
                         quantize=options.quantize,
                         lora_slots=options.max_active_adapters,
                         max_lora_rank=adapter_limits(options).max_rank,
                         compile=options.compile)
    read = runner.weights_read
    log.info("rank %d on %s, %s kernels; read %.1f MiB of the checkpoint's %.1f MiB",
             args.rank, device, runner.kernels, read.bytes_read / 2**20, read.num_bytes / 2**20)
    log.info("rank %d KV cache: %s", args.rank, runner.kv_note)
    if runner.graphs is not None:
        log.info("rank %d: decode steps of %s sequences replay CUDA graphs (captured in %.1f s)",
                 args.rank, ", ".join(map(str, runner.graphs.sizes)), runner.graphs.capture_s)
    return runner, tp


def worker_main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    options = decode_options(args.options)
    configure_logging(json_output=options.json_output, level=options.log_level,
                      process=f"worker{args.rank}")
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"rank-%d" % args.rank)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(args.endpoint)
    tp = None
    try:
        sock.send(encode(Hello(PROTOCOL_VERSION, args.rank, args.world_size, os.getpid())))
        try:
            runner, tp = _load(args, options)
        except Exception as exc:  # noqa: BLE001 - reported to the supervisor, then exit
            from loraxd.worker.kv_sizing import KvCacheTooLarge
            from loraxd.worker.models import UnsupportedModel

            log.error("cannot load the model: %s", exc)
            log.debug("%s", traceback.format_exc())
            unsupported = isinstance(exc, (UnsupportedModel, FileNotFoundError,
                                           KvCacheTooLarge))
            sock.send(encode(WorkerError(args.rank, f"cannot load the model: {exc}",
                                         unsupported=unsupported)))
            return 1
        return _serve(runner, sock, args, options)
    finally:
        if tp is not None:
            tp.close()
        sock.close()
        ctx.term()


def _serve(runner, sock: zmq.Socket, args: argparse.Namespace, options: WorkerOptions) -> int:
    adapters = AdapterLoader(runner, options.adapter_memory_bytes,
                             limits=adapter_limits(options))
    sock.send(encode(Ready(rank=args.rank, **runner.ready_info())))
    try:
        Worker(runner, sock, args.rank, adapters, args.world_size).serve()
    except GroupBroken as exc:
        log.error("%s; leaving the tensor-parallel group", exc)
        log.debug("%s", traceback.format_exc())
        sock.send(encode(WorkerError(args.rank, str(exc))))
        return 1
    finally:
        adapters.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
