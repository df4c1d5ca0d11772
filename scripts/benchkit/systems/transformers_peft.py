"""The baseline: transformers' batched `generate` in this process, all of a load's streams
as one batch (PEFT's `adapter_names` for the adapter loads). It has no server, so a
stream's first token is the first decode step's and its inter-token gaps are the steps'."""
from __future__ import annotations

import contextlib
import time

from scripts.benchkit.context import BenchContext
from scripts.benchkit.loads import PROBE_PROMPT, PROMPTS, Load
from scripts.benchkit.stats import RoundResult, StreamTiming

NAME = "transformers+PEFT"
RESTART_PER_STREAMS = False


class StepClock:
    """A logits processor that only notes when each step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class Baseline:
    def __init__(self, ctx: BenchContext):
        import torch
        from transformers import AutoTokenizer
        torch.set_num_threads(ctx.threads)
        self.ctx, self.torch = ctx, torch
        self.tok = AutoTokenizer.from_pretrained(ctx.model_dir, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.info = {"threads": ctx.threads}
        self._models: dict[bool, object] = {}

    def _model(self, with_adapters: bool):
        if with_adapters not in self._models:
            self._models.clear()  # one model at a time
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(
                self.ctx.model_dir, dtype=getattr(self.torch, self.ctx.dtype))
            if with_adapters:
                from peft import PeftModel
                names = self.ctx.adapter_names
                model = PeftModel.from_pretrained(model, self.ctx.adapter_root / names[0],
                                                  adapter_name=names[0])
                for name in names[1:]:
                    model.load_adapter(self.ctx.adapter_root / name, adapter_name=name)
            self._models[with_adapters] = model.eval()
        return self._models[with_adapters]

    def round(self, load: Load, new_tokens: int) -> RoundResult:
        from transformers import LogitsProcessorList
        model = self._model(bool(load.adapters))
        enc = self.tok([PROMPTS[i % len(PROMPTS)] for i in range(load.streams)],
                       return_tensors="pt", padding=True)
        extra = {}
        if load.adapters:
            extra["adapter_names"] = [self.ctx.adapter_names[load.adapter_of(i)]
                                      for i in range(load.streams)]
        clock = StepClock()
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=self.tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([clock]), **extra)
        wall = time.perf_counter() - t0
        generated = out.shape[1] - enc.input_ids.shape[1]
        if generated != new_tokens or len(clock.times) != new_tokens:
            raise RuntimeError(f"{load.name}: generated {generated} tokens in "
                               f"{len(clock.times)} steps, expected {new_tokens}")
        return RoundResult([StreamTiming(t0, list(clock.times), new_tokens)
                            for _ in range(load.streams)], wall)

    def probe_texts(self, adapters: int, new_tokens: int = 8) -> list[str]:
        """As `loads.probe_texts`: the base model's greedy text, then each adapter's."""
        enc = self.tok([PROBE_PROMPT], return_tensors="pt")
        texts = []
        for adapter in [None, *range(adapters)]:
            model = self._model(adapter is not None)
            extra = {} if adapter is None else {"adapter_names": [self.ctx.adapter_names[adapter]]}
            with self.torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=self.tok.pad_token_id, **extra)
            texts.append(self.tok.decode(out[0, enc.input_ids.shape[1]:],
                                         skip_special_tokens=True))
        return texts

    def run_load(self, load: Load, new_tokens: int, rounds: int) -> list[RoundResult]:
        self.round(load, min(4, new_tokens))  # warm-up
        return [self.round(load, new_tokens) for _ in range(rounds)]


@contextlib.contextmanager
def serve(ctx: BenchContext, max_streams: int):
    yield Baseline(ctx)
