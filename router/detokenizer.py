"""Incremental detokenization and stop strings for one request's output."""
from __future__ import annotations

from engine.output import find_stop


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    A character split over several tokens decodes to U+FFFD until its last
    token arrives, so text ending in U+FFFD is held back. With stop strings,
    the last `longest stop - 1` characters are held back too: they could be
    the start of a stop string that the next token completes.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.token_ids: list[int] = []
        self._sent = 0                 # characters already given out
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def add(self, token_ids, final: bool = False) -> str:
        """Append tokens; return the new text that may be sent (cut at a stop string)."""
        self.token_ids.extend(token_ids)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stops:
            at = find_stop(text, self.stops, max(0, self._sent - self._hold))
            if at >= 0:
                self.stopped, final, text = True, True, text[:at]
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[:max(self._sent, len(text) - self._hold)]
        delta = text[self._sent:]
        self._sent = max(self._sent, len(text))
        return delta
