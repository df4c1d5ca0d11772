"""Messages between the scheduler (ROUTER) and the workers (DEALER).

Every message is a tagged msgspec Struct, sent as one msgpack frame (see codec.py).
The scheduler keeps the request state and the workers keep the tensors: a sequence's
prompt travels once, in `NewSeq`; after that a `Step` only names what changed.
"""
from __future__ import annotations

from typing import Literal

import msgspec

# -- worker -> scheduler -------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True, frozen=True):
    protocol_version: int
    rank: int
    world_size: int
    pid: int


class Ready(msgspec.Struct, tag=True, frozen=True):
    """The model is loaded and the KV cache allocated; `num_blocks` pages of `block_size`.

    The byte counts are this rank's own: its shard of the weights and of the KV cache.
    `device_uuid`: its CUDA device's, by which the supervisor reads the device's name and
    memory in NVML; "" on a CPU."""

    rank: int
    num_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: list[int]
    max_position_embeddings: int
    dtype: str
    device: str
    architecture: str
    weight_bytes: int = 0
    kv_cache_bytes: int = 0
    device_uuid: str = ""
    quantize: str | None = None  # how the layers' weights are held (None: in `dtype`)


class SeqOutput(msgspec.Struct, array_like=True, frozen=True):
    """One sequence's sampled token in a step."""

    req_id: int
    token_id: int
    logprob: float
    top_ids: list[int] = []  # return_k_alternatives, best first
    top_logprobs: list[float] = []
    prompt_logprobs: list[float] | None = None  # for prompt tokens 1.., on prefill only


class SeqFailure(msgspec.Struct, array_like=True, frozen=True):
    """A sequence that got no token in a step; the worker has already forgotten it.

    `bad_request`: its own sampling parameters caused it (a 422), not the model (a 500).
    """

    req_id: int
    message: str
    bad_request: bool = False


class StepResult(msgspec.Struct, tag=True, frozen=True):
    step_id: int
    outputs: list[SeqOutput]
    forward_s: float
    failed: list[SeqFailure] = []  # sequences that failed alone; the others go on


class AdapterLoaded(msgspec.Struct, tag=True, frozen=True):
    """Answer to LoadAdapter; `error` is None on success."""

    slot: int
    adapter_key: str
    error: str | None = None
    # What the rank's host-memory LRU holds after this load: adapter paths, a merge's key.
    host_cached: list[str] = []


class WorkerError(msgspec.Struct, tag=True, frozen=True):
    """A fatal error in a worker; it exits after sending this."""

    rank: int
    message: str
    unsupported: bool = False  # the model or a setting can't be run: a config error


class Pong(msgspec.Struct, tag=True, frozen=True):
    """Answer to Ping: the rank's main loop is alive."""

    rank: int
    seq: int


class FrameRejected(msgspec.Struct, tag=True, frozen=True):
    """The rank could not decode a frame it was sent; it keeps serving."""

    rank: int
    message: str


class StepFailed(msgspec.Struct, tag=True, frozen=True):
    """A step raised; the worker keeps serving. The named requests must be failed."""

    step_id: int
    req_ids: list[int]
    message: str


# -- supervisor -> worker, at start -------------------------------------------------------


class WorkerOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a worker needs to start, from the config tree: one JSON argument.

    No field has a default: the supervisor names every one, so a worker never guesses.
    `master_port` is the rendezvous port of the tensor-parallel group (the supervisor picks
    a free one when the config leaves it 0); unused with one rank.

    The KV cache: `max_batch_total_tokens` 0 sizes it from free memory (CUDA only, within
    `cuda_memory_fraction`, leaving room for a step of `max_batch_prefill_tokens`);
    `num_blocks` > 0 pins its pages (a replaced group keeps the first group's)."""

    dtype: str
    quantize: str | None  # None, or "int8-weight-only"
    device: str  # cpu or cuda: the supervisor resolves auto
    block_size: int
    max_batch_total_tokens: int
    cuda_memory_fraction: float
    max_batch_prefill_tokens: int
    num_blocks: int
    num_threads: int
    max_active_adapters: int
    adapter_memory_bytes: int
    max_lora_rank: int
    max_adapter_bytes: int
    master_addr: str
    master_port: int
    collective_timeout_s: float  # worker.ready_timeout_s: see worker/distributed.py
    log_level: str
    json_output: bool
    watermark_gamma: float  # the green list's share of the vocabulary
    watermark_delta: float  # the bias added to a green token's logit
    kernel_dir: str  # where a worker builds its CPU kernels when set-up left none
    compile: bool  # decode steps replayed from CUDA graphs (worker/decode_graphs.py)


# -- scheduler -> worker -------------------------------------------------------------------


class SamplingParams(msgspec.Struct, array_like=True, frozen=True):
    do_sample: bool = False  # False: greedy, whatever the other knobs say
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    num_alternatives: int = 0  # return_k_alternatives
    prompt_logprobs: bool = False  # decoder_input_details
    watermark: bool = False  # bias each step's green list (Kirchenbauer et al.)
    grammar: str = ""  # an llguidance grammar the output must match; "": unconstrained


class NewSeq(msgspec.Struct, array_like=True, frozen=True):
    """A sequence to prefill in this step; the worker keeps its state until it finishes.

    A sequence resumed on a new worker is prefilled with its prompt and the tokens it had
    generated: `num_generated` says how many of `prompt_ids` are those, so penalties and
    seeded draws carry on exactly where they were.

    The first `num_cached` tokens' K/V are already in its first pages (the prefix cache);
    this step computes the next `num_computed` (0: all the rest). A prompt not computed
    to its end goes on in later steps (`Step.prefill_chunks`) and is sampled after its last.
    """

    req_id: int
    prompt_ids: list[int]
    block_ids: list[int]  # KV pages that hold the prompt, in order
    sampling: SamplingParams
    adapter_slot: int = -1  # -1: the base model
    num_generated: int = 0
    num_cached: int = 0
    num_computed: int = 0


class Step(msgspec.Struct, tag=True, frozen=True):
    """Run one forward pass: prefill `new_seqs`, decode one token for each of `decode_ids`.

    `finished_ids` are freed and `clear_blocks` zeroed before the step runs; `new_blocks`
    are KV pages appended to a running sequence's page table; `prefill_chunks` names running
    sequences whose prompt goes on, with the tokens of it this step computes.
    """

    step_id: int
    new_seqs: list[NewSeq] = []
    decode_ids: list[int] = []
    new_blocks: dict[int, list[int]] = {}
    finished_ids: list[int] = []
    prefill_chunks: dict[int, int] = {}
    clear_blocks: list[int] = []


class AdapterMerge(msgspec.Struct, array_like=True, frozen=True):
    """A per-request merge of several adapters (LoRAX's `merged_adapters`)."""

    paths: list[str]
    weights: list[float]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"


class LoadAdapter(msgspec.Struct, tag=True, frozen=True):
    """Load the PEFT adapter in directory `path`, or the merge `merge`, into slot `slot`.

    `roots`: every file read must resolve inside one of these directories (its source's)."""

    slot: int
    adapter_key: str
    path: str = ""
    merge: AdapterMerge | None = None
    roots: list[str] = []


class Ping(msgspec.Struct, tag=True, frozen=True):
    """Sent while no step runs; every rank answers Pong with the same `seq`."""

    seq: int


class SetLogLevel(msgspec.Struct, tag=True, frozen=True):
    """Write log lines of `level` and above from now on (loraxctl log-level, a reload).

    The level is checked when the frame is decoded: any other name is an undecodable frame.
    """

    level: Literal["debug", "info", "warning", "error"]  # loraxd.logs.LEVELS


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


ToWorker = Step | LoadAdapter | Ping | SetLogLevel | Shutdown
FromWorker = (Hello | Ready | StepResult | StepFailed | AdapterLoaded | Pong | FrameRejected
              | WorkerError)
