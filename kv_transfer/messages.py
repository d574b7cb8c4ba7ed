"""The KV channel's message framing, shared by its sender (`channel`) and receiver
(`channel_receiver`): a kind frame, a JSON header, then data frames."""
from __future__ import annotations

import json

import zmq

# A closing socket keeps trying this long to deliver what is queued on it (a last ABORT
# or ACK); with linger 0 those were dropped whenever the connection was not up yet.
CLOSE_LINGER_MS = 200


def send(sock, frames: list, track: bool = False):
    """Non-blocking send; None when the peer's queue is full (the receiver's timeout retries)."""
    try:
        return sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=track) or True
    except zmq.Again:
        return None


def header(head: dict) -> bytes:
    return json.dumps(head).encode()


def parse(frames) -> tuple[bytes, dict, list] | None:
    """(kind, header, data frames) of a message, or None if it is malformed."""
    try:
        kind, head = bytes(frames[0].buffer), json.loads(bytes(frames[1].buffer))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("transfer_id"), str):
        return None
    return kind, head, list(frames[2:])
