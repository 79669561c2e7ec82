"""X-Hub-Signature-256: HMAC-SHA256 of the raw body with the webhook secret. Pure.

GitHub: `X-Hub-Signature-256: sha256=<hex>`; compare in constant time (hmac.compare_digest).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from ttci.model.errors import TTError

__all__ = ["SignatureError", "sign", "verify"]

_HEADER_RE = re.compile(r"\Asha256=(?P<hex>[0-9a-f]{64})\Z")


class SignatureError(TTError):
    """A delivery is unsigned or its signature does not match."""


def sign(secret: bytes, body: bytes) -> str:
    """The header value GitHub sends for body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> None:
    """Raise SignatureError unless header is the signature of body with secret."""
    if not secret:
        raise SignatureError(
            "no webhook secret is configured", hint="set TT_GH_WEBHOOK_SECRET or --secret-file"
        )
    if not header:
        raise SignatureError(
            "the delivery has no X-Hub-Signature-256 header",
            hint="set a secret on the GitHub App's or repository's webhook",
        )
    m = _HEADER_RE.match(header.strip().lower())
    if not m:
        raise SignatureError(
            "X-Hub-Signature-256 is not of the form sha256=<64 hex digits>",
            hint="GitHub sends sha256=HEX; X-Hub-Signature (SHA-1) is not accepted",
        )
    want = hmac.new(secret, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, m["hex"]):
        raise SignatureError(
            "X-Hub-Signature-256 does not match the body",
            hint="the webhook secret on GitHub and TT_GH_WEBHOOK_SECRET must be the same",
        )
