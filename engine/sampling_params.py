"""Sampling parameters of one request, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

_MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy. top_k 0 (or -1) disables top-k; top_p 1.0 disables
    nucleus sampling. A seed makes sampling reproducible per request, also when
    its tokens are produced by different workers (the seed is mixed with the
    token's position, there is no generator state to carry).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(self.stop is not None and not isinstance(self.stop, (int, float, bytes)),
               f"stop must be a string or a list of strings, got {self.stop!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            _check(hasattr(self.stop, "__iter__"), f"stop must be a string or a list of strings, got {self.stop!r}")
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_int(self.max_tokens), f"max_tokens must be an integer, got {self.max_tokens!r}")
        _check(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}")
        _check(_is_number(self.temperature) and self.temperature >= 0.0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
               f"top_p must be a number in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1,
               f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", f"stop strings must be non-empty strings, got {s!r}")

    @classmethod
    def from_message(cls, msg) -> SamplingParams:
        """From a `pdcluster.v1.SamplingParams` protobuf message (read by field name)."""
        def opt(name, default):
            return getattr(msg, name) if msg.HasField(name) else default
        return cls(max_tokens=opt("max_tokens", 16), temperature=opt("temperature", 1.0),
                   top_p=opt("top_p", 1.0), top_k=msg.top_k, seed=opt("seed", None),
                   stop=tuple(msg.stop), ignore_eos=msg.ignore_eos)

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32: it is argmax anyway.
        return self.temperature < _MIN_TEMPERATURE


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    # NaN fails every comparison, so range checks after this reject it too
    return isinstance(x, (int, float)) and not isinstance(x, bool)
