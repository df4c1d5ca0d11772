"""A request's output text, token by token: the one place that detokenizes, finds stop
sequences and holds back text that may be the start of one, for every API.

Each token costs time linear in its own text (and the number of stop sequences), never in
the text so far: stop sequences are matched by Knuth–Morris–Pratt automata fed only the new
characters, and a generation that stops is cut at the earliest match, whatever the order of
the `stop` list.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraxd.engine.detokenizer import IncrementalDetokenizer


def _failure_table(pattern: str) -> list[int]:
    """KMP: table[i] is the length of the longest proper prefix of pattern[:i+1] that is
    also its suffix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """Finds stop sequences in text fed piece by piece."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._tables = [_failure_table(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: its prefix the text ends with

    def feed(self, piece: str) -> int | None:
        """Where the earliest stop sequence that `piece` completes starts, as an offset from
        the start of `piece` (negative: it began in earlier text); None if none completes."""
        earliest = None
        for n, (stop, table) in enumerate(zip(self.stops, self._tables)):
            k = self._matched[n]
            for i, char in enumerate(piece):
                while k and stop[k] != char:
                    k = table[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    start = i + 1 - k
                    earliest = start if earliest is None else min(earliest, start)
                    break
            self._matched[n] = k
        return earliest

    @property
    def pending(self) -> int:
        """How many trailing characters may be the start of a stop sequence."""
        return max(self._matched, default=0)


@dataclass(frozen=True)
class TextUpdate:
    piece: str  # the token's own text ('' while a character is incomplete, or special)
    delta: str  # the text it makes visible
    stopped: bool  # a stop sequence completed: the text ends where it starts


class OutputText:
    """Detokenizes a sequence's tokens and cuts its text at the first stop sequence.

    What it shows is never a stop sequence nor a prefix of one that may still complete:
    such a tail is held until the next token settles it, or `release()` at the end.
    """

    def __init__(self, detok: IncrementalDetokenizer, stop: tuple[str, ...]):
        self._detok = detok
        self._stops = StopMatcher(stop) if any(stop) else None
        self._shown: list[str] = []
        self._held = ""

    def push(self, token_id: int) -> TextUpdate:
        piece = self._detok.push(token_id)
        if self._stops is None or not piece:
            self._shown.append(piece)
            return TextUpdate(piece, piece, False)
        window = self._held + piece  # a match can only start in the held tail or the piece
        at = self._stops.feed(piece)
        if at is not None:
            delta, self._held = window[:len(self._held) + at], ""
        else:
            cut = len(window) - self._stops.pending
            delta, self._held = window[:cut], window[cut:]
        self._shown.append(delta)
        return TextUpdate(piece, delta, at is not None)

    def release(self) -> str:
        """The held tail, shown now that no stop sequence can complete it (the end)."""
        held, self._held = self._held, ""
        self._shown.append(held)
        return held

    @property
    def text(self) -> str:
        """The text so far: what was shown, then what is held."""
        return "".join(self._shown) + self._held
