"""The bearer token both front doors ask for (router.auth_token, or PDCLUSTER_AUTH_TOKEN).

gRPC clients send it as the metadata `authorization: Bearer <token>`, HTTP
clients as the `Authorization: Bearer <token>` header. The comparison runs in
constant time (hmac.compare_digest), so its duration tells nothing about how
much of a guess was right.
"""
from __future__ import annotations

import hmac

SCHEME = "bearer"


class BearerToken:
    def __init__(self, token: str | None) -> None:
        self._expected = token.encode() if token else None

    @property
    def required(self) -> bool:
        return self._expected is not None

    def accepts(self, authorization: str | bytes | None) -> bool:
        """True when no token is required, or the header value is `Bearer <the token>`."""
        if self._expected is None:
            return True
        if authorization is None:
            return False
        if isinstance(authorization, str):
            # surrogateescape: a header of any bytes compares (and fails) instead of raising
            authorization = authorization.encode("utf-8", "surrogateescape")
        scheme, _, given = authorization.strip().partition(b" ")
        if scheme.lower() != SCHEME.encode():
            return False
        return hmac.compare_digest(given.strip(), self._expected)


def refusal(token: BearerToken, authorization: str | bytes | None) -> str | None:
    """Why a request with this header is refused, or None when it may pass."""
    if token.accepts(authorization):
        return None
    if not authorization:
        return "this server needs a bearer token: send the header 'Authorization: Bearer <token>'"
    return "the bearer token is wrong"
