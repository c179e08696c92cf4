"""Sign-in proofs (x402 ``sign-in-with-x``, CAIP-122 / EIP-4361) as an agent makes them, in tests.

The message is formatted here from EIP-4361 independently of ``predictions.auth``, and the
header is the x402 SDK's own ``SIWxPayload`` encoding, so an accepted proof cross-checks both
the wire shape and the message format.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import encode_defunct
from x402.extensions.sign_in_with_x import SIWxPayload, encode_siwx_header


def eip4361(fields: dict[str, Any]) -> str:
    """The EIP-4361 message for ``fields`` (the SIWX payload's names)."""
    lines = [f"{fields['domain']} wants you to sign in with your Ethereum account:", fields["address"], ""]
    if fields.get("statement"):
        lines += [fields["statement"], ""]
    else:
        lines += [""]
    lines += [
        f"URI: {fields['uri']}",
        f"Version: {fields['version']}",
        f"Chain ID: {fields['chainId'].removeprefix('eip155:')}",
        f"Nonce: {fields['nonce']}",
        f"Issued At: {fields['issuedAt']}",
    ]
    for name, label in (("expirationTime", "Expiration Time"), ("notBefore", "Not Before"), ("requestId", "Request ID")):
        if fields.get(name):
            lines.append(f"{label}: {fields[name]}")
    if fields.get("resources"):
        lines += ["Resources:", *[f"- {r}" for r in fields["resources"]]]
    return "\n".join(lines)


def siwx_fields(
    key: str, origin: str, *, issued_at: datetime | None = None, nonce: str | None = None, **tampered: Any
) -> dict[str, Any]:
    """A signed proof for ``origin`` (``https://host``); ``tampered`` fields are put in after
    signing (a forged or hostile proof)."""
    when = issued_at or datetime.now(UTC)
    fields: dict[str, Any] = {
        "domain": urlsplit(origin).netloc,
        "address": Account.from_key(key).address,
        "statement": "List the predictions my payments bought.",
        "uri": origin + "/v1/predictions",
        "version": "1",
        "chainId": "eip155:31337",
        "type": "eip191",
        "nonce": nonce or secrets.token_hex(16),
        "issuedAt": when.isoformat().replace("+00:00", "Z"),
        "expirationTime": (when + timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
        "resources": [origin + "/v1/predictions"],
    }
    signed = Account.sign_message(encode_defunct(text=eip4361(fields)), key)
    fields["signature"] = "0x" + bytes(signed.signature).hex()
    fields.update(tampered)
    return fields


def siwx_header(key: str, origin: str, **kwargs: Any) -> str:
    """The ``SIGN-IN-WITH-X`` header value (``siwx_fields``), encoded by the x402 SDK."""
    return encode_siwx_header(SIWxPayload.model_validate(siwx_fields(key, origin, **kwargs)))
