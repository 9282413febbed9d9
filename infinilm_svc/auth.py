"""Bearer tokens, as every role checks them: the scheme in any case, the secret in constant time."""
from __future__ import annotations

import hashlib
import hmac
from typing import Iterable


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive), or None."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    token = authorization[7:].strip()
    return token or None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """A set of accepted tokens. A lookup costs the same whatever the given token shares with a
    real one: the token is hashed first, and only hashes are compared (no early exit on a prefix).
    An empty ring accepts everything (no keys configured = open)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = frozenset(_digest(k) for k in keys)

    @property
    def open(self) -> bool:
        return not self._digests

    def allows(self, authorization: str | None) -> bool:
        """True when no keys are set, or the header carries one of them."""
        if not self._digests:
            return True
        token = bearer_token(authorization)
        if token is None:
            return False
        given = _digest(token)
        ok = False
        for d in self._digests:  # every digest is compared, so the time does not depend on which matched
            ok |= hmac.compare_digest(given, d)
        return ok
