"""ModelRunner: what it tells the scheduler, the LoRA seam, state across steps, bf16."""
from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loraxd.protocol.worker import (NewSeq, Ready, SamplingParams, SeqFailure,  # noqa: E402
                                   SeqOutput, Step)
from loraxd.worker.runner import ModelRunner, StepRejected, UnsupportedModel  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model, hf_greedy  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("llama")
    model = build_tiny_model("llama-untied-llama3-rope", out_dir)
    runner = ModelRunner(str(out_dir), block_size=4, max_batch_total_tokens=512, num_threads=2)
    return model, runner, out_dir


def test_ready_info_has_the_ready_fields(llama):
    _, runner, _ = llama
    info = runner.ready_info()
    assert set(info) == set(Ready.__struct_fields__) - {"rank"}
    Ready(rank=0, **info)  # the types fit
    assert info["num_blocks"] >= 512 // 4 and info["block_size"] == 4
    assert info["vocab_size"] == 256 and info["architecture"] == "LlamaForCausalLM"
    assert info["dtype"] == "float32" and info["device"] == "cpu"


def test_module_shapes_for_lora_validation(llama):
    _, runner, _ = llama
    assert runner.num_layers == 2
    assert runner.module_shapes == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel) as err:
        ModelRunner(str(tmp_path))
    assert str(err.value) == (
        "architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, "
        "Gemma3ForCausalLM, Phi3ForCausalLM")


def test_model_type_fallback_and_eos_list(llama, tmp_path):
    _, _, model_dir = llama
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    runner = ModelRunner(str(tmp_path), max_batch_total_tokens=64, num_threads=2)
    assert runner.ready_info()["architecture"] == "LlamaForCausalLM"
    assert runner.ready_info()["eos_token_ids"] == [2, 7]


class DenseLora:
    """A stand-in for the LoRA code: one adapter (slot 0), a random low-rank delta on every
    group of every layer, applied to the tokens of slot 0 only (from ctx.token_slots)."""

    def __init__(self, runner: ModelRunner, rank: int = 4, scale: float = 0.3):
        g = torch.Generator().manual_seed(11)
        shapes = runner.module_shapes
        widths = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                  "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
        self.deltas = {}  # (layer, group) -> [out, in]
        for layer in range(runner.num_layers):
            for group, names in widths.items():
                fan_in = shapes[names[0]][0]
                out = sum(shapes[n][1] for n in names)
                a = torch.randn(rank, fan_in, generator=g) * scale
                b = torch.randn(out, rank, generator=g) * scale
                self.deltas[layer, group] = b @ a
        self.prepared = []
        self.mask = None

    def prepare(self, ctx):
        self.prepared.append(ctx.token_slots.tolist())
        self.mask = ctx.token_slots == 0

    def apply(self, layer_idx, group, x, y):
        y[self.mask] += x[self.mask] @ self.deltas[layer_idx, group].T

    def merged_into(self, model):
        merged = copy.deepcopy(model)
        names = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                 "down": ("mlp.down_proj",)}
        params = dict(merged.named_parameters())
        with torch.no_grad():
            for (layer, group), delta in self.deltas.items():
                row = 0
                for name in names[group]:
                    weight = params[f"model.layers.{layer}.{name}.weight"]
                    weight += delta[row:row + weight.shape[0]]
                    row += weight.shape[0]
        return merged


def test_lora_seam_equals_merged_weights(llama):
    """Each group's hook gets the linear's input and its [q|k|v] / [gate|up] output: a delta
    added there gives the tokens of the model with the delta merged into its weights, and
    only for the sequences using the adapter."""
    model, runner, _ = llama
    lora = DenseLora(runner)
    prompts = {1: [5, 9, 33, 100, 7], 2: [8, 1, 200, 45], 3: [17, 17, 3]}
    got = Driver(runner).run([(1, prompts[1], 0, 8), (2, prompts[2], 0, 8),
                              (3, prompts[3], 2, 6)], lora=lora, slots={1: 0, 3: 0})
    merged = lora.merged_into(model)
    with_adapter = hf_greedy(merged, prompts[1], 8)
    assert [o.token_id for o in got[1]] == with_adapter
    assert with_adapter != hf_greedy(model, prompts[1], 8)  # the delta does change tokens
    assert [o.token_id for o in got[3]] == hf_greedy(merged, prompts[3], 6)
    assert [o.token_id for o in got[2]] == hf_greedy(model, prompts[2], 8)
    assert lora.prepared[0] == [0] * 5 + [-1] * 4  # token_slots of the first step
    assert lora.prepared[1] == [0, -1]  # decode steps remember each sequence's slot


def test_ctx_lora_is_none_without_adapters(llama):
    _, runner, _ = llama

    class Exploding:
        def prepare(self, ctx):
            raise AssertionError("prepare called for a base-only step")

        def apply(self, *args):
            raise AssertionError("apply called for a base-only step")

    Driver(runner).run([(1, [1, 2, 3], 0, 3)], lora=Exploding())


def test_seeded_sampling_same_tokens_alone_or_in_a_batch(llama):
    _, runner, _ = llama
    sampling = SamplingParams(do_sample=True, temperature=1.3, top_p=0.95, seed=1234)
    prompt = [4, 4, 90, 12, 6]
    alone = Driver(runner).run([(1, prompt, 0, 12)], sampling=sampling)[1]
    batch = Driver(runner, seed=5).run([(9, [7, 7, 7, 7, 7, 7, 7], 0, 12), (1, prompt, 1, 12),
                                        (4, [1], 2, 5)], sampling=sampling)[1]
    assert [o.token_id for o in alone] == [o.token_id for o in batch]


def test_failed_step_leaves_no_state(llama):
    _, runner, _ = llama
    bad = NewSeq(77, [1, 2, 3], [0], SamplingParams())  # a block id, then a bad decode id
    with pytest.raises(StepRejected, match="12345"):  # alike on every rank: no rank runs it
        runner.execute(Step(0, new_seqs=[bad], decode_ids=[12345]))
    assert 77 not in runner.seqs
    runner.execute(Step(1, new_seqs=[bad]))  # the same request can be retried
    runner.execute(Step(2, finished_ids=[77]))
    assert not runner.seqs


def test_empty_step_and_unknown_finished_ids(llama):
    _, runner, _ = llama
    assert runner.execute(Step(0, finished_ids=[424242])) == []


def test_bfloat16_runs(llama):
    model, _, model_dir = llama
    runner = ModelRunner(str(model_dir), dtype="bfloat16", block_size=4,
                         max_batch_total_tokens=128, num_threads=2)
    assert runner.ready_info()["dtype"] == "bfloat16"
    prompt = [5, 9, 33, 100, 7, 8, 41]
    out = Driver(runner).run([(1, prompt, 0, 6), (2, prompt[:3], 1, 4)])
    expected = hf_greedy(model, prompt, 6)
    tokens = [o.token_id for o in out[1]]
    assert all(0 <= t < 256 for t in tokens) and all(o.logprob <= 0 for o in out[1])
    assert tokens[0] == expected[0]  # a decisive model: bf16 agrees at least at first


def test_too_few_blocks_is_an_error_not_a_corruption(llama):
    _, runner, _ = llama
    good = NewSeq(5, [1, 2, 3, 4], [3], SamplingParams())
    short = NewSeq(6, [1, 2, 3, 4, 5], [4], SamplingParams())  # 5 tokens, one 4-slot block
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(Step(0, new_seqs=[good, short]))
    assert not runner.seqs
    runner.execute(Step(1, new_seqs=[good]))
    with pytest.raises(ValueError, match="no room"):  # token 5 needs a second block
        runner.execute(Step(2, decode_ids=[5]))
    runner.forget([5])
    assert not runner.seqs


def test_sharded_checkpoint_loads(llama, tmp_path):
    model, runner, _ = llama
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = ModelRunner(str(tmp_path), block_size=4, max_batch_total_tokens=64, num_threads=2)
    prompt = [9, 8, 7, 6]
    assert ([o.token_id for o in Driver(sharded).run([(1, prompt, 0, 5)])[1]]
            == [o.token_id for o in Driver(runner).run([(1, prompt, 0, 5)])[1]])


def test_a_sequence_the_sampler_cannot_serve_fails_alone(llama):
    _, runner, _ = llama
    good = NewSeq(21, [5, 9, 33, 100], [10, 30], SamplingParams())
    poisoned = NewSeq(22, list(range(40, 80)), list(range(11, 21)),  # 40 penalised tokens
                      SamplingParams(do_sample=True, repetition_penalty=1e-50, seed=3))
    first = runner.execute(Step(0, new_seqs=[good, poisoned]))
    assert isinstance(first[0], SeqOutput) and first[0].req_id == 21
    assert isinstance(first[1], SeqFailure) and first[1].req_id == 22 and first[1].bad_request
    assert 22 not in runner.seqs  # forgotten at once: nothing to free later
    second = runner.execute(Step(1, decode_ids=[21]))
    assert [type(o) for o in second] == [SeqOutput]
    runner.forget([21])
    alone = Driver(runner).run([(1, [5, 9, 33, 100], 0, 2)])[1]
    assert [first[0].token_id, second[0].token_id] == [o.token_id for o in alone]


class NaNLora:
    """A LoRA step whose adapter (slot 0) writes NaN into layer 0's attention output."""

    def prepare(self, ctx):
        self.mask = ctx.token_slots == 0

    def apply(self, layer_idx, group, x, y):
        if layer_idx == 0 and group == "o":
            y[self.mask] = float("nan")


def greedy_tokens(runner, req_id, prompt, blocks, n, step_id=100, clear=()):
    """`n` greedy tokens of `prompt` on pages `blocks`, one sequence alone; `clear`: pages
    the first step zeroes first."""
    out = runner.execute(Step(step_id, new_seqs=[NewSeq(req_id, prompt, blocks,
                                                        SamplingParams())],
                              clear_blocks=list(clear)))
    tokens = [out[0].token_id]
    for i in range(1, n):
        out = runner.execute(Step(step_id + i, decode_ids=[req_id]))
        assert isinstance(out[0], SeqOutput), out
        tokens.append(out[0].token_id)
    runner.forget([req_id])
    return tokens


def test_a_nan_sequence_leaves_no_nan_on_its_pages(llama):
    """Its pages go to the next request, whose masked decode reads see what they hold: the
    scheduler has them zeroed (clear_blocks) in the next step."""
    _, runner, _ = llama
    expected = greedy_tokens(runner, 30, [9], [70, 71], 6)
    poisoned = NewSeq(31, [5, 6, 7, 8, 9, 10, 11, 12], [40, 41], SamplingParams(),
                      adapter_slot=0)
    out = runner.execute(Step(0, new_seqs=[poisoned]), lora=NaNLora())
    assert isinstance(out[0], SeqFailure) and not out[0].bad_request
    assert "not finite" in out[0].message
    assert not torch.isfinite(runner.kv_cache.data[1:, 41 * 4:42 * 4]).all()
    assert greedy_tokens(runner, 32, [9], [41, 42], 6, clear=[40, 41]) == expected


def test_padded_decode_reads_never_reach_another_sequences_pages(llama):
    """A short sequence's unused page-table columns once named pages now being filled
    with NaN by another sequence of the same step."""
    _, runner, _ = llama
    expected = greedy_tokens(runner, 40, [9], [80], 3)
    runner.execute(Step(0, new_seqs=[NewSeq(41, [1, 2, 3, 4, 5, 6, 7, 8, 9], [50, 51, 52],
                                            SamplingParams())]))
    runner.forget([41])  # its table row, naming 50..52, is free again
    short = NewSeq(42, [9], [60], SamplingParams())
    long = NewSeq(43, [1, 2, 3, 4, 5, 6, 7, 8, 9], [61, 62, 63], SamplingParams())
    first = runner.execute(Step(1, new_seqs=[short, long]))
    poisoned = NewSeq(44, [5, 6, 7, 8, 9, 10, 11, 12], [51, 52], SamplingParams(),
                      adapter_slot=0)
    second = runner.execute(Step(2, new_seqs=[poisoned], decode_ids=[42, 43]), lora=NaNLora())
    assert isinstance(second[0], SeqFailure)
    assert [type(o) for o in second[1:]] == [SeqOutput, SeqOutput], second
    third = runner.execute(Step(3, decode_ids=[42, 43]))
    assert [first[0].token_id, second[1].token_id, third[0].token_id] == expected
    runner.forget([42, 43])
