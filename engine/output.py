"""What a finished request returns, and stop-string detection over decoded text."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index where the earliest stop string begins in text[start:...], or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class StopChecker:
    """Decodes one request's output as it grows and finds its stop strings.

    Each step decodes the output so far (a multi-token character may only
    resolve later) but searches only the tail that could hold a new match.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self._searched = 0
        self._longest = max(len(s) for s in stops)

    def check(self, token_ids: list[int]) -> str | None:
        """The output text cut before the stop string if one appeared, else None."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        at = find_stop(text, self.stops, max(0, self._searched - self._longest + 1))
        self._searched = len(text)
        return text[:at] if at >= 0 else None
