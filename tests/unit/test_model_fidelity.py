"""Greedy tokens of ModelRunner == transformers' generate(do_sample=False), same weights.

Tiny random models of each family (2 layers, hidden 64, GQA, vocab 256), made decisive
with a large initializer_range so that logits are never near ties; then the same check on
the real default model when LORAXD_TEST_MODEL_DIR names its converted directory.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from loraxd.protocol.worker import NewSeq, SamplingParams, SeqOutput, Step  # noqa: E402
from loraxd.worker.runner import ModelRunner  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.5)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5, pad_token_id=0)

FAMILIES = {
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-untied-llama3-rope": ("LlamaConfig", dict(
        tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})),
    "llama-linear-rope-bias": ("LlamaConfig", dict(
        tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-yarn-rope": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral-sliding-window": ("MistralConfig", dict(sliding_window=7, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen2-tied-mha": ("Qwen2Config", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "qwen3-sliding-bias": ("Qwen3Config", dict(
        head_dim=24, tie_word_embeddings=True, attention_bias=True, use_sliding_window=True,
        sliding_window=5, max_window_layers=1)),
    "gemma2": ("Gemma2Config", dict(**GEMMA, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(**GEMMA, layer_types=[
        "sliding_attention", "full_attention"], rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "phi3-sliding": ("Phi3Config", dict(pad_token_id=0, sliding_window=7)),
}
LAYOUTS = ("saved", "v4")  # as the installed transformers saves it; rewritten as 4.x did


def v4_layout(config: dict) -> dict:
    """The same config as transformers 4.x wrote it: top-level rope_theta / rope_scaling
    (Gemma 3: rope_local_base_freq, sliding_window_pattern), no layer_types, torch_dtype."""
    config = dict(config)
    rope = config.pop("rope_parameters")
    if "full_attention" in rope:  # keyed by layer type (Gemma 3)
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    rope = dict(rope)
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    kinds = config.pop("layer_types", None)
    if config["model_type"] == "gemma3_text":
        config["sliding_window_pattern"] = kinds.index("full_attention") + 1
        config.pop("_sliding_window_pattern", None)
    elif config["model_type"] == "gemma2":
        assert kinds == ["sliding_attention", "full_attention"] * (len(kinds) // 2)
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    return config


def build_tiny_model(family: str, out_dir: Path, layout: str = "saved"):
    """Save a tiny random model of `family` to out_dir (its config in `layout`); return the
    HF model (eval, fp32)."""
    config_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**TINY, **extra})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norm weights start at constants; make them matter
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    if layout == "v4":
        path = Path(out_dir) / "config.json"
        path.write_text(json.dumps(v4_layout(json.loads(path.read_text())), indent=2))
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Driver:
    """Plays the scheduler: a trivial block allocator (shuffled, so pages are scattered)
    and the Step messages of continuous batching."""

    def __init__(self, runner: ModelRunner, seed: int = 0):
        self.runner = runner
        self.block_size = runner.block_size
        self.free = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.step_id = 0

    def _take(self, n: int) -> list[int]:
        return [self.free.pop() for _ in range(n)]

    def step(self, new: list[tuple[int, list[int], SamplingParams, int]] = (),
             decode: list[int] = (), finished: list[int] = (), lora=None) -> list[SeqOutput]:
        for req_id in finished:
            self.free.extend(self.tables.pop(req_id))
            del self.lens[req_id]
        new_seqs = []
        for req_id, prompt, sampling, slot in new:
            blocks = self._take(math.ceil(len(prompt) / self.block_size))
            self.tables[req_id], self.lens[req_id] = blocks, len(prompt)
            new_seqs.append(NewSeq(req_id, list(prompt), blocks, sampling, slot))
        new_blocks = {}
        for req_id in decode:
            self.lens[req_id] += 1
            missing = math.ceil(self.lens[req_id] / self.block_size) - len(self.tables[req_id])
            if missing > 0:
                new_blocks[req_id] = self._take(missing)
                self.tables[req_id] += new_blocks[req_id]
        step = Step(self.step_id, new_seqs=new_seqs, decode_ids=list(decode),
                    new_blocks=new_blocks, finished_ids=list(finished))
        self.step_id += 1
        return self.runner.execute(step, lora=lora)

    def run(self, requests: list[tuple[int, list[int], int, int]],
            sampling: SamplingParams = SamplingParams(), lora=None, slots=None
            ) -> dict[int, list[SeqOutput]]:
        """requests: (req_id, prompt, join_step, max_new_tokens); returns outputs per req."""
        slots = slots or {}
        outputs: dict[int, list[SeqOutput]] = {r[0]: [] for r in requests}
        budget = {r[0]: r[3] for r in requests}
        pending = list(requests)
        running: list[int] = []
        finished: list[int] = []
        t = 0
        while pending or running or finished:
            joining = [(r[0], r[1], sampling, slots.get(r[0], -1)) for r in pending
                       if r[2] == t]
            pending = [r for r in pending if r[2] != t]
            outs = self.step(joining, running, finished, lora=lora)
            finished, running = [], []
            for out in outs:
                outputs[out.req_id].append(out)
                done = len(outputs[out.req_id]) >= budget[out.req_id]
                (finished if done else running).append(out.req_id)
            t += 1
        return outputs


@pytest.fixture(scope="module", params=[(family, layout) for family in sorted(FAMILIES)
                                        for layout in LAYOUTS], ids="-".join)
def tiny(request, tmp_path_factory):
    family, layout = request.param
    out_dir = tmp_path_factory.mktemp(family)
    model = build_tiny_model(family, out_dir, layout)
    runner = ModelRunner(str(out_dir), block_size=4, max_batch_total_tokens=1024,
                         num_threads=2)
    return model, runner


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_layouts_read_the_same(family, tmp_path):
    from loraxd.worker.models import resolve
    build_tiny_model(family, tmp_path / "saved")
    build_tiny_model(family, tmp_path / "v4", "v4")
    saved, v4 = resolve(tmp_path / "saved"), resolve(tmp_path / "v4")
    assert saved == v4
    assert json.loads((tmp_path / "v4" / "config.json").read_text()).get("rope_theta")


def test_single_sequence_matches_transformers(tiny):
    model, runner = tiny
    prompt = [5, 9, 33, 100, 7, 8, 41, 250, 17]
    expected = hf_greedy(model, prompt, 14)
    outputs = Driver(runner).run([(1, prompt, 0, 14)])[1]
    assert [o.token_id for o in outputs] == expected
    assert all(o.logprob <= 0.0 for o in outputs)


def test_continuous_batch_matches_transformers(tiny):
    """8 prompts of different lengths join at different steps: prefills share steps with
    other sequences' decodes, and sequences finish and free their pages mid-run."""
    model, runner = tiny
    rng = random.Random(7)
    lengths = [3, 17, 9, 1, 12, 25, 6, 14]
    joins = [0, 0, 1, 3, 3, 4, 6, 9]
    budgets = [10, 6, 12, 8, 9, 5, 11, 7]
    requests = [(100 + i, [rng.randrange(256) for _ in range(n)], join, budget)
                for i, (n, join, budget) in enumerate(zip(lengths, joins, budgets))]
    got = Driver(runner, seed=3).run(requests)
    for req_id, prompt, _, budget in requests:
        assert [o.token_id for o in got[req_id]] == hf_greedy(model, prompt, budget), req_id
    assert not runner.seqs  # every sequence was freed


def test_logprobs_match_transformers(tiny):
    model, runner = tiny
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    sampling = SamplingParams(prompt_logprobs=True, num_alternatives=3)
    out = Driver(runner).run([(7, prompt, 0, 1)], sampling=sampling)[7][0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    expected_prompt = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert out.prompt_logprobs == pytest.approx(expected_prompt.tolist(), abs=1e-4)
    top = torch.topk(logprobs[-1], 3)
    assert out.top_ids == top.indices.tolist()
    assert out.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out.token_id == out.top_ids[0]
    assert out.logprob == pytest.approx(out.top_logprobs[0], abs=1e-6)


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does.",
    "Give me three tips for sleeping better.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "Name the planets of the solar system.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def default_reference(default_model_dir, tmp_path_factory):
    """The chat prompts and transformers' greedy answers with the default model, and a copy
    of the model as the installed transformers' save_pretrained writes it (the layout of
    every new checkpoint)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    saved = tmp_path_factory.mktemp("saved")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
               for text in CHAT_PROMPTS]
    model.generation_config.eos_token_id = None
    expected = [hf_greedy(model, prompt, 24) for prompt in prompts]
    assert tokenizer.decode(expected[0]).startswith("The capital of France is Paris.")
    return {"converted": default_model_dir, "save_pretrained": saved}, prompts, expected


@pytest.mark.parametrize("layout", ["converted", "save_pretrained"])
def test_default_model_matches_transformers(default_reference, layout):
    """Skipped unless LORAXD_TEST_MODEL_DIR names the converted default model (conftest)."""
    model_dirs, prompts, expected = default_reference
    runner = ModelRunner(str(model_dirs[layout]))
    got = Driver(runner).run([(i, p, 0, 24) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert [o.token_id for o in got[i]] == expected[i], CHAT_PROMPTS[i]
