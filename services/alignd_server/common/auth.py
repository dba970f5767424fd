"""Bearer-token authentication."""

from __future__ import annotations

import hmac
from pathlib import Path


def load_tokens(path: Path) -> list[bytes]:
    """Reads accepted tokens, one per line; blank lines and ``#`` comments are ignored.

    Raises:
        ValueError: the file holds no token.
    """
    tokens = [
        line.strip().encode()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not tokens:
        raise ValueError(f"auth token file {path} holds no token")
    return tokens


class TokenVerifier:
    """Checks ``authorization: Bearer <token>`` metadata against the accepted tokens.

    Every accepted token is compared in constant time, and all of them are always compared, so
    the time taken reveals neither which token matched nor how much of one did.
    """

    def __init__(self, tokens: list[bytes]) -> None:
        if not tokens:
            raise ValueError("at least one token is required")
        self._tokens = tokens

    def verify(self, authorization: str | None) -> bool:
        """Returns whether an ``authorization`` metadata value carries an accepted token."""
        if not authorization:
            return False
        scheme, _, presented = authorization.partition(" ")
        candidate = presented.strip().encode()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched and scheme.lower() == "bearer"
