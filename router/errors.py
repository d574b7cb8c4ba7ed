"""Why a request was refused or failed, independent of the front door that reports it.

The gRPC front maps a `Status` to its status code, the HTTP front to an HTTP
status and OpenAI's error shape; both carry the same message.
"""
from __future__ import annotations

import enum


class Status(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"       # the request as given cannot run (400)
    ALREADY_EXISTS = "already_exists"           # its request id is in flight (409)
    RESOURCE_EXHAUSTED = "resource_exhausted"   # too many requests in flight: retry later (429)
    UNAVAILABLE = "unavailable"                 # no instance can serve it now (503)
    INTERNAL = "internal"                       # a worker failed it (500)


class RequestError(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
