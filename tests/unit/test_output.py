"""The output processor (loraxd.engine.output): detokenized text, stop sequences, holdback;
and both APIs' text through the engine's Sequence."""
from __future__ import annotations

import pytest

from loraxd.engine.output import OutputText, StopMatcher
from tests.unit.test_http_native import PROMPT, post_generate, sse_events
from tests.unit.test_http_native import serve  # noqa: F401 - the fixture, shared
from tests.unit.test_http_openai import SequenceEngine
from tests.unit.test_http_openai import api  # noqa: F401 - the fixture, shared


class Pieces:
    """A detokenizer whose token i is pieces[i]."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def push(self, token_id: int) -> str:
        return self.pieces[token_id]


def run(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], str, bool]:
    """(each token's delta, the final text, whether a stop sequence ended it)."""
    out = OutputText(Pieces(pieces), stop)
    deltas = []
    for i in range(len(pieces)):
        update = out.push(i)
        deltas.append(update.delta)
        assert update.piece == pieces[i]
        if update.stopped:
            return deltas, out.text, True
    deltas[-1] += out.release()
    return deltas, out.text, False


def test_no_stop_sequences_show_every_piece_at_once():
    assert run(["ab", "", "c"], ()) == (["ab", "", "c"], "abc", False)


def test_a_possible_start_of_a_stop_sequence_is_held_until_settled():
    assert run(["ab #", "#", "x", "y ##", "z"], ("###",)) == (
        ["ab ", "", "##x", "y ", "##z"], "ab ##xy ##z", False)
    deltas, text, stopped = run(["one\n", "E", "two", "ENDx"], ("END", "\n\n"))
    assert deltas == ["one", "\n", "Etwo", ""] and text == "one\nEtwo" and stopped


def test_the_held_tail_is_shown_at_the_end():
    assert run(["ab", "#"], ("###",)) == (["ab", "#"], "ab#", False)


@pytest.mark.parametrize("stop", [("o w", "llo"), ("llo", "o w")])
def test_cut_at_the_earliest_match_whatever_the_order(stop):
    """Both complete in the token "lo wor": the text ends before the earlier one."""
    assert run(["Hel", "lo wor", "ld"], stop) == (["He", ""], "He", True)


@pytest.mark.parametrize("stop", [("bc", "abcd"), ("abcd", "bc")])
def test_a_longer_stop_that_starts_earlier_wins_within_one_token(stop):
    assert run(["x", "abcd"], stop)[1:] == ("x", True)
    assert run(["x", "ab", "cd"], stop)[1:] == ("x", True)  # both complete with "cd"
    assert run(["x", "abc", "d"], stop)[1:] == ("xa", True)  # "bc" completed first


def test_a_match_across_tokens_and_a_repeated_prefix():
    assert run(["aa", "ab", "x"], ("aab",))[1:] == ("a", True)
    assert run(["ab", "ab", "abc"], ("ababc",))[1:] == ("ab", True)


def test_matcher_state_is_bounded_by_the_stop_length():
    m = StopMatcher(("abc", "b"))
    assert m.feed("xxab") == 3 and StopMatcher(("abc",)).feed("ab") is None
    m = StopMatcher(("abc",))
    for _ in range(10_000):
        assert m.feed("ab") is None  # never matched, whatever came before
        assert m.pending == 2
    assert m.feed("c") == -2


# -- both APIs: the engine's text --------------------------------------------------------------


PIECES = ["Hel", "lo wor", "ld"]


@pytest.mark.parametrize("stop", [["o w", "llo"], ["llo", "o w"]])
async def test_native_routes_cut_at_the_earliest_stop(serve, stop):  # noqa: F811
    client, _ = await serve(SequenceEngine(PIECES))
    resp = await post_generate(client, {"stop": stop, "details": True})
    out = await resp.json()
    assert out["generated_text"] == "He"
    assert out["details"]["finish_reason"] == "stop_sequence"
    resp = await post_generate(client, {"stop": stop}, path="/generate_stream")
    events = sse_events(await resp.text())
    assert [e["token"]["text"] for e in events] == ["Hel", "lo wor"]  # tokens as generated
    assert events[-1]["generated_text"] == "He"


@pytest.mark.parametrize("stop", [["o w", "llo"], ["llo", "o w"]])
async def test_openai_routes_cut_at_the_earliest_stop(api, stop):  # noqa: F811
    oc, _, _ = await api(SequenceEngine(PIECES))
    resp = await oc.completions.create(model="fake/base", prompt=PROMPT, stop=stop)
    assert resp.choices[0].text == "He" and resp.choices[0].finish_reason == "stop"
    stream = await oc.completions.create(model="fake/base", prompt=PROMPT, stop=stop,
                                         stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == "He"
