"""Next-token choice for a batch of sequences, each with its own SamplingParams.

Work is vectorised over the batch; the one per-sequence loop is the draw of the sampled
rows. Each draw is seeded from the request's seed and the draw's index in its sequence, so a
seed gives the same tokens whatever batch the sequence shares, and a sequence resumed on a
new worker draws exactly what the old one would have. When every sequence is greedy without penalties, a
fast path does an argmax and a logsumexp and nothing else (on CPU one kernel call of both).

Semantics (transformers / OpenAI / LoRAX):
- the watermark (loraxd.worker.layers.watermark) biases the raw logits first, as LoRAX does;
- penalties apply to greedy and sampled sequences alike (as LoRAX does): repetition penalty
  (HF, over prompt + generated ids), frequency and presence penalties (OpenAI, over
  generated ids);
- a constrained sequence (loraxd.worker.layers.grammar) has every token its grammar does
  not allow next set to -inf, after the penalties;
- greedy (`do_sample` False): argmax of the penalised scores;
- sampled: temperature, then top-k, top-p, typical-p (HF's warpers, in HF's order) and a
  draw;
- `logprob` is the log-softmax of the scores after the watermark, penalties, grammar and
  temperature (before the top-k/p/typical filters), and so are the alternatives;
- a temperature below MIN_TEMPERATURE samples greedily: that is the limit of the
  distribution as the temperature falls, and dividing by it would overflow float32.

A row whose scores are not finite (NaN or inf logits, penalties or a temperature that
overflow) or whose filtered distribution has nothing left to draw gets no token: it is
named in `SampleOutput.failures` and the other rows are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraxd.protocol.worker import SamplingParams
from loraxd.worker.cpu_kernels.small_ops import argmax_logsumexp
from loraxd.worker.layers.grammar import SeqGrammar
from loraxd.worker.layers.watermark import Watermark

NEG_INF = float("-inf")
_DRAW_STRIDE = 0x9E3779B97F4A7C15  # spreads the draws of one seed over the 64-bit seed space
MIN_TEMPERATURE = 1e-6  # the HTTP door refuses tinier ones; this guards every other caller


@dataclass(eq=False)
class SeqSampling:
    """What the sampler needs to remember about a running sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt + generated so far
    prompt_len: int
    grammar: SeqGrammar | None = None  # where a constrained sequence is in its grammar
    watermark: Watermark | None = None  # the worker's, when the request asked for one
    fast: bool = field(init=False)  # plain greedy: argmax of the raw logits
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        p = self.params
        self.fast = (not self.is_sampled() and p.repetition_penalty == 1.0
                     and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
                     and self.grammar is None and self.watermark is None)
        self._generator = torch.Generator()

    def accept(self, token_id: int) -> None:
        """The token was chosen: it joins the context and advances the grammar."""
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def is_sampled(self) -> bool:
        return self.params.do_sample and self.params.temperature >= MIN_TEMPERATURE

    def draw_generator(self) -> torch.Generator:
        """The generator of the next draw: seeded from (seed, number of tokens generated)."""
        draw = len(self.token_ids) - self.prompt_len
        return self._generator.manual_seed((self.params.seed + draw * _DRAW_STRIDE) % 2**64)


@dataclass(frozen=True)
class RowFailure:
    """Why a row got no token; `bad_request`: its sampling parameters are the cause."""

    reason: str
    bad_request: bool


@dataclass
class SampleOutput:
    token_ids: list[int]  # -1 for a failed row
    logprobs: list[float]
    top_ids: list[list[int]]  # best first; empty lists where no alternatives were asked
    top_logprobs: list[list[float]]
    failures: dict[int, RowFailure] = field(default_factory=dict)  # row -> why


def sample(logits: torch.Tensor, seqs: list[SeqSampling]) -> SampleOutput:
    """logits [num_seqs, vocab] (fp32) -> one token per sequence, or why it has none."""
    fast = all(s.fast for s in seqs)
    scores = logits if fast else _penalised_scores(logits, seqs)
    tokens, lse = argmax_logsumexp(scores)  # the greedy rows' choice; lse [num_seqs, 1]
    # NaN or +inf anywhere in a row, or no finite score left, makes its lse non-finite
    unusable = ~torch.isfinite(lse[:, 0])
    sampled = [] if fast else [i for i, s in enumerate(seqs) if s.is_sampled()]
    undrawable = _draw(scores, seqs, sampled, tokens) if sampled else []
    chosen = (scores.gather(1, tokens[:, None]) - lse)[:, 0]
    token_ids = tokens.masked_fill(unusable, -1).tolist()  # one transfer, failures included
    failures = {}
    if undrawable or -1 in token_ids:  # rare: explain each failed row
        failures = _explain(logits, seqs, token_ids, undrawable)
        for row in failures:
            token_ids[row] = -1
    top_ids, top_logprobs = _alternatives(scores, lse, seqs)
    return SampleOutput(token_ids, chosen.tolist(), top_ids, top_logprobs, failures)


def _explain(logits: torch.Tensor, seqs: list[SeqSampling], token_ids: list[int],
             undrawable: list[int]) -> dict[int, RowFailure]:
    """Why each failed row (token -1, or nothing to draw) failed: the model or its request."""
    out = {}
    for row in [i for i, t in enumerate(token_ids) if t == -1]:
        grammar = seqs[row].grammar
        if grammar is not None and grammar.error() is not None:
            out[row] = RowFailure(f"the output cannot follow its response format: "
                                  f"{grammar.error()}", bad_request=True)
        elif not bool(torch.isfinite(logits[row]).all()):
            out[row] = RowFailure("the model's logits are not finite (NaN or inf)",
                                  bad_request=False)
        else:
            out[row] = RowFailure(f"the sampling parameters ({_knobs(seqs[row].params)}) "
                                  "make the scores overflow float32", bad_request=True)
    for row in undrawable:
        out.setdefault(row, RowFailure(
            f"the sampling parameters ({_knobs(seqs[row].params)}) leave no token to sample",
            bad_request=True))
    return out


def _knobs(p: SamplingParams) -> str:
    """The parameters that change the scores, where they differ from their defaults."""
    knobs = {"temperature": p.temperature if p.do_sample else 1.0,
             "repetition_penalty": p.repetition_penalty,
             "frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty,
             "top_k": p.top_k if p.do_sample else 0, "top_p": p.top_p if p.do_sample else 1.0,
             "typical_p": p.typical_p if p.do_sample else 1.0}
    defaults = SamplingParams()
    changed = [f"{k}={v!r}" for k, v in knobs.items() if v != getattr(defaults, k)]
    return ", ".join(changed) or "defaults"


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int]) -> list[float]:
    """logits [prompt_len, vocab] of a prompt's rows -> logprob of tokens 1.. given their prefix."""
    if len(prompt_ids) < 2:
        return []
    targets = torch.tensor(prompt_ids[1:], device=logits.device)[:, None]
    rows = logits[:-1]
    return (rows.gather(1, targets) - torch.logsumexp(rows, -1, keepdim=True))[:, 0].tolist()


def _penalised_scores(logits: torch.Tensor, seqs: list[SeqSampling]) -> torch.Tensor:
    scores = logits.clone()
    rows = [i for i, s in enumerate(seqs) if s.watermark is not None]
    if rows:
        seqs[rows[0]].watermark.bias(scores, rows, [seqs[i].token_ids[-1] for i in rows])
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rows:
        ids = [seqs[i].token_ids for i in rows]
        penalty = [seqs[i].params.repetition_penalty for i in rows]
        scores[rows] = repetition_penalty(scores[rows], ids, penalty)
    rows = [i for i, s in enumerate(seqs)
            if s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0]
    if rows:
        ids = [seqs[i].token_ids[seqs[i].prompt_len:] for i in rows]
        freq = [seqs[i].params.frequency_penalty for i in rows]
        presence = [seqs[i].params.presence_penalty for i in rows]
        scores[rows] = frequency_presence_penalty(scores[rows], ids, freq, presence)
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if rows:
        allowed = seqs[rows[0]].grammar.owner.allowed([seqs[i].grammar for i in rows],
                                                       scores.device)
        scores[rows] = scores[rows].masked_fill(~allowed, NEG_INF)
    rows = [i for i, s in enumerate(seqs) if s.is_sampled() and s.params.temperature != 1.0]
    if rows:
        temperature = torch.tensor([seqs[i].params.temperature for i in rows],
                                   device=scores.device)
        scores[rows] = scores[rows] / temperature[:, None]
    return scores


def _pad(ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [n, max_len] ids (padding repeats index 0) and the mask of real entries."""
    width = max(1, max(len(row) for row in ids))
    padded = torch.tensor([row + [0] * (width - len(row)) for row in ids], device=device)
    lens = torch.tensor([len(row) for row in ids], device=device)
    valid = torch.arange(width, device=device)[None, :] < lens[:, None]
    return padded, valid


def repetition_penalty(scores: torch.Tensor, ids: list[list[int]], penalty: list[float]
                       ) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, a penalty per row."""
    padded, valid = _pad(ids, scores.device)
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, padded, valid)
    p = torch.tensor(penalty, device=scores.device, dtype=scores.dtype)[:, None]
    penalised = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(seen, penalised, scores)


def frequency_presence_penalty(scores: torch.Tensor, ids: list[list[int]], freq: list[float],
                               presence: list[float]) -> torch.Tensor:
    """OpenAI's penalties: minus count*frequency and minus presence once a token appeared."""
    padded, valid = _pad(ids, scores.device)
    counts = torch.zeros_like(scores).scatter_add_(1, padded, valid.to(scores.dtype))
    f = torch.tensor(freq, device=scores.device, dtype=scores.dtype)[:, None]
    pr = torch.tensor(presence, device=scores.device, dtype=scores.dtype)[:, None]
    return scores - counts * f - (counts > 0).to(scores.dtype) * pr


def _draw(scores: torch.Tensor, seqs: list[SeqSampling], sampled: list[int],
          tokens: torch.Tensor) -> list[int]:
    """Draw the sampled rows' tokens into `tokens`; returns the rows with nothing to draw."""
    params = [seqs[i].params for i in sampled]
    warped = scores[sampled]  # [num_sampled, vocab], a copy
    if any(p.top_k > 0 for p in params):
        warped = top_k_filter(warped, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        warped = top_p_filter(warped, [p.top_p for p in params])
    if any(p.typical_p < 1.0 for p in params):
        warped = typical_filter(warped, [p.typical_p for p in params])
    probs = warped.softmax(-1).cpu()  # the generators are CPU ones, on every device
    drawable = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
    draws = {i: torch.multinomial(probs[j], 1, generator=seqs[i].draw_generator())
             for j, i in enumerate(sampled) if drawable[j]}
    if draws:
        tokens[list(draws)] = torch.cat(list(draws.values())).to(tokens.device)
    return [i for j, i in enumerate(sampled) if not drawable[j]]


def top_k_filter(scores: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """transformers' TopKLogitsWarper per row; k 0 keeps every token."""
    vocab = scores.shape[-1]
    ks = [min(k, vocab) if k > 0 else 0 for k in top_k]
    kth_values = torch.topk(scores, max(ks), -1).values  # [n, max_k]
    k = torch.tensor(ks, device=scores.device)
    kth = kth_values.gather(1, (k - 1).clamp(min=0)[:, None])
    kth = kth.masked_fill((k == 0)[:, None], NEG_INF)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """transformers' TopPLogitsWarper per row; p >= 1 keeps every token."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    threshold = torch.tensor([1 - p if p < 1.0 else -1.0 for p in top_p],
                             device=scores.device, dtype=scores.dtype)[:, None]
    remove = cumulative <= threshold
    remove[:, -1] = False  # min_tokens_to_keep = 1
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, NEG_INF)


def typical_filter(scores: torch.Tensor, typical_p: list[float]) -> torch.Tensor:
    """transformers' TypicalLogitsWarper per row; p >= 1 keeps every token."""
    normalized = torch.log_softmax(scores, -1)
    p = torch.exp(normalized)
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs(-normalized - entropy)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    sorted_logits = scores.gather(-1, sorted_indices)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    mass = torch.tensor(typical_p, device=scores.device, dtype=scores.dtype)[:, None]
    last_ind = (cumulative < mass).sum(1).clamp_(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last_ind[:, None])
    remove[:, :1] = False  # min_tokens_to_keep = 1
    remove &= (mass < 1.0)
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, NEG_INF)


def _alternatives(scores: torch.Tensor, lse: torch.Tensor, seqs: list[SeqSampling]
                  ) -> tuple[list[list[int]], list[list[float]]]:
    counts = [min(s.params.num_alternatives, scores.shape[-1]) for s in seqs]
    most = max(counts, default=0)
    if most <= 0:
        return [[] for _ in seqs], [[] for _ in seqs]
    values, ids = torch.topk(scores, most, -1)
    ids, logprobs = ids.tolist(), (values - lse).tolist()
    return ([row[:k] for row, k in zip(ids, counts)],
            [row[:k] for row, k in zip(logprobs, counts)])
