"""What the front doors read of the router's config section (cluster.config.RouterConfig) beyond
what the core reads (core.RouterSettings)."""
from __future__ import annotations

from typing import Protocol


class FrontDoorSettings(Protocol):
    host: str
    http_port: int | None          # None: no HTTP API
    served_model_name: str | None
    tls_cert: str | None           # PEM paths; TLS on both fronts when set
    tls_key: str | None
    tls_client_ca: str | None
    auth_token: str | None
    max_prompt_tokens: int | None
    max_tokens_limit: int | None
    max_stop_strings: int
    max_stop_string_len: int
