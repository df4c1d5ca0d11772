"""The watermark: green lists seeded by the previous token (TGI's construction), biased in the
sampler for the rows that asked, detectable by their share of green tokens."""
from __future__ import annotations

import torch

from loraxd.protocol.worker import SamplingParams
from loraxd.worker.layers.sampler import SeqSampling, sample
from loraxd.worker.layers.watermark import HASH_KEY, Watermark

VOCAB = 500


def test_green_list_is_tgis_construction():
    mark = Watermark(gamma=0.25)
    generator = torch.Generator().manual_seed(HASH_KEY * 17)
    expected = torch.randperm(VOCAB, generator=generator)[:125]
    assert torch.equal(mark.green_ids(17, VOCAB), expected)
    assert not torch.equal(mark.green_ids(18, VOCAB), expected)


def generate(mark: Watermark | None, steps: int = 200) -> list[int]:
    seq = SeqSampling(SamplingParams(do_sample=True, seed=5), [3], 1, watermark=mark)
    for step in range(steps):
        logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(step))
        seq.accept(sample(logits, [seq]).token_ids[0])
    return seq.token_ids


def test_watermarked_text_is_mostly_green():
    mark = Watermark(gamma=0.5, delta=2.0)
    marked = mark.green_fraction(generate(mark), VOCAB)
    plain = mark.green_fraction(generate(None), VOCAB)
    assert marked > 0.75, marked  # ~e^2/(1+e^2) = 0.88 for flat-ish logits
    assert 0.35 < plain < 0.65, plain  # ~gamma


def test_only_the_rows_that_asked_are_biased():
    mark = Watermark(gamma=0.5, delta=1000.0)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    seqs = [SeqSampling(SamplingParams(), [7], 1, watermark=mark),
            SeqSampling(SamplingParams(), [7], 1)]
    tokens = sample(logits, seqs).token_ids
    assert tokens[0] in mark.green_ids(7, VOCAB).tolist()
    assert tokens[1] == int(logits[1].argmax())
