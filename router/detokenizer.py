"""Incremental detokenization and stop strings for one request's output."""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.output import find_stop

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Detokenizer:
    """Turns a growing list of token ids into text deltas, in time linear in the output.

    Each chunk decodes only a short window of tokens: from `_prefix` (tokens
    already turned into text, kept as context so tokenizers that merge spaces
    across tokens decode the same way) to the end. The text the window adds
    past the decode of `[_prefix, _read)` is appended to `text`. A character
    split over several tokens decodes to U+FFFD until its last token arrives,
    so such a window is not committed yet. With stop strings, the last
    `longest stop - 1` characters are held back too: they could be the start
    of a stop string that the next token completes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.token_ids: list[int] = []
        self.text = ""                 # the output decoded so far (complete characters)
        self._prefix = 0               # token window start: context for the next decode
        self._read = 0                 # tokens already reflected in `text`
        self._sent = 0                 # characters already given out
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def add(self, token_ids, final: bool = False) -> str:
        """Append tokens; return the new text that may be sent (cut at a stop string)."""
        self.token_ids.extend(token_ids)
        if self.tokenizer is None:
            return ""
        searched_from = len(self.text)
        self._decode_window(final)
        text = self.text
        if self.stops:
            at = find_stop(text, self.stops, max(0, min(self._sent, searched_from) - self._hold))
            if at >= 0:
                self.stopped, final, text = True, True, text[:at]
        if not final:
            text = text[:max(self._sent, len(text) - self._hold)]
        delta = text[self._sent:]
        self._sent = max(self._sent, len(text))
        return delta

    def _decode_window(self, final: bool) -> None:
        ids = self.token_ids
        before = self.tokenizer.decode(ids[self._prefix:self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(ids[self._prefix:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return                     # half a character: wait for its next token
        if len(window) > len(before) or final:
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(ids)
