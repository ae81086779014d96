"""Error messages quote a bad value by a short prefix: a 20 KB model name or 50k stop strings must
not make the message itself too large to deliver (gRPC's 8 KB metadata limit, log lines)."""
from __future__ import annotations

QUOTE_CHARS = 80
MESSAGE_CHARS = 1024


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to `limit` characters with the full size said when longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} {'chars' if isinstance(value, (str, bytes)) else 'items'}" \
        if hasattr(value, "__len__") else f"{len(text)} chars as text"
    return f"{text[:limit]}... ({size})"


def clip(message: str, limit: int = MESSAGE_CHARS) -> str:
    """A whole message cut to `limit` characters (the last guard before it leaves the server)."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} chars)"
