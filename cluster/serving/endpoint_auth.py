"""Who may call an endpoint, shared by the gRPC and HTTP servers: one check of their auth and TLS
settings, one constant-time comparison of a bearer token."""
from __future__ import annotations

import hmac


def checked_token(auth_token: str | None, tls_cert: object | None, tls_key: object | None) -> bytes | None:
    """The token to require (stripped, as bytes), or None for none; ValueError for a blank token
    or half a TLS pair."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together")
    if auth_token is not None and not auth_token.strip():
        raise ValueError("auth_token must not be empty")
    return auth_token.strip().encode() if auth_token else None


def bearer_matches(header: str, token: bytes) -> bool:
    """Whether an `Authorization` value is `Bearer <token>` (scheme case-insensitive)."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)
