"""Typed errors of the engine. Each message names the offending input."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt or sampling parameters) cannot be served as given."""


class ModelLoadError(EngineError):
    """A model directory is missing, malformed, or of an unsupported architecture."""


class OutOfBlocksError(EngineError):
    """The KV cache has no room for what was asked (a caller skipped can_allocate)."""


class ConfigError(EngineError, ValueError):
    """An engine option has a value it cannot use; the message names the option."""
