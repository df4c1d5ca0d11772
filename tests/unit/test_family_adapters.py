"""Each model family carries LoRA adapters in mixed batches exactly as PEFT computes them.

For a tiny random model of each family, two random PEFT adapters on every linear module
(`all-linear`, as PEFT names that family's modules: Phi-3's fused qkv_proj and
gate_up_proj included); greedy tokens and their logprobs equal PEFT's for each adapter
alone, and in one continuous batch with the base model and the other adapter.
"""
from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from loraxd.protocol.worker import SamplingParams  # noqa: E402
from loraxd.worker.runner import ModelRunner  # noqa: E402
from tests.unit.test_model_fidelity import Driver, build_tiny_model, hf_greedy  # noqa: E402

FAMILIES = ["llama-tied", "qwen3", "gemma2", "gemma3", "phi3", "mistral-sliding-window"]
NEW_TOKENS = 10
TOP = 3  # top logprobs compared per step


def _save_adapter(base, out_dir, seed: int, rank: int):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # a change that moves the argmax, not noise
    model.save_pretrained(out_dir)
    return model.unload()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_model(request.param, root / "model")
    base = _save_adapter(base, root / "a", seed=1, rank=8)
    base = _save_adapter(base, root / "b", seed=2, rank=4)
    rng = random.Random(5)
    prompts = {name: [rng.randrange(256) for _ in range(n)]
               for name, n in (("base", 7), ("a", 11), ("b", 4))}
    expected = {"base": _reference(base, prompts["base"])}
    with torch.inference_mode():
        model = peft.PeftModel.from_pretrained(base, root / "a", adapter_name="a")
        model.load_adapter(root / "b", adapter_name="b")
        for name in ("a", "b"):
            model.set_adapter(name)
            expected[name] = _reference(model, prompts[name])
    runner = ModelRunner(str(root / "model"), block_size=4, max_batch_total_tokens=512,
                         num_threads=2)
    runner.enable_lora(num_slots=2)
    for slot, name in enumerate(("a", "b")):
        runner.install_adapter(slot, runner.read_adapter(str(root / name)))
    return runner, prompts, expected


def _reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' (or PEFT's) greedy tokens and each step's top logprobs: those show an
    adapter's effect even where a tiny model's argmax hardly moves."""
    tokens = hf_greedy(model, prompt, NEW_TOKENS)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    return tokens, torch.topk(logprobs, TOP).values.flatten().tolist()


def _top(outputs) -> list[float]:
    return [lp for o in outputs for lp in o.top_logprobs]


def _check(outputs, expected, name: str) -> None:
    tokens, top = expected
    assert [o.token_id for o in outputs] == tokens, name
    assert _top(outputs) == pytest.approx(top, abs=2e-3), name


def _run(runner, requests, slots, seed=0):
    return Driver(runner, seed).run(requests, SamplingParams(num_alternatives=TOP), slots=slots)


def test_each_adapter_alone_matches_peft(family):
    runner, prompts, expected = family
    for slot, name in enumerate(("a", "b")):
        _check(_run(runner, [(1, prompts[name], 0, NEW_TOKENS)], {1: slot})[1],
               expected[name], name)
        base = _run(runner, [(2, prompts[name], 0, NEW_TOKENS)], {})[2]
        assert _top(base) != pytest.approx(expected[name][1], abs=2e-3)  # it does something


def test_mixed_batch_with_base_and_another_adapter_matches_peft(family):
    runner, prompts, expected = family
    requests = [(10, prompts["base"], 0, NEW_TOKENS), (11, prompts["a"], 0, NEW_TOKENS),
                (12, prompts["b"], 2, NEW_TOKENS)]
    got = _run(runner, requests, {11: 0, 12: 1}, seed=4)
    for req_id, name in ((10, "base"), (11, "a"), (12, "b")):
        _check(got[req_id], expected[name], name)


def test_adapters_out_of_slot_order_in_a_batch_match_peft(family):
    """The runner regroups a step's rows by adapter: every result still reaches its own
    request."""
    runner, prompts, expected = family
    requests = [(20, prompts["b"], 0, NEW_TOKENS), (21, prompts["base"], 0, NEW_TOKENS),
                (22, prompts["a"], 0, NEW_TOKENS), (23, prompts["b"], 1, NEW_TOKENS)]
    got = _run(runner, requests, {20: 1, 22: 0, 23: 1}, seed=6)
    for req_id, name in ((20, "b"), (21, "base"), (22, "a"), (23, "b")):
        _check(got[req_id], expected[name], name)
