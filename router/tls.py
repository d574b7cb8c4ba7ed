"""TLS for both front doors, from router.tls_cert / tls_key (PEM) and, for mutual TLS,
router.tls_client_ca: the CA whose certificates clients must present."""
from __future__ import annotations

import ssl

import grpc

from engine.errors import ConfigError
from router.front_settings import FrontDoorSettings


def read_pem(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path!r}: {e.strerror}") from None


def grpc_server_credentials(settings: FrontDoorSettings) -> grpc.ServerCredentials | None:
    """None when TLS is off (router.tls_cert unset)."""
    if settings.tls_cert is None:
        return None
    pair = (read_pem(settings.tls_key, "router.tls_key"), read_pem(settings.tls_cert, "router.tls_cert"))
    ca = settings.tls_client_ca
    return grpc.ssl_server_credentials([pair], root_certificates=read_pem(ca, "router.tls_client_ca") if ca else None,
                                       require_client_auth=ca is not None)


def uvicorn_ssl_options(settings: FrontDoorSettings) -> dict:
    """uvicorn.Config keyword arguments for the same certificate ({} when TLS is off)."""
    if settings.tls_cert is None:
        return {}
    options = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls_client_ca is not None:
        options |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
