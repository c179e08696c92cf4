"""A synchronous httpx transport that pays x402 challenges: give it to any httpx-based client.

The official SDK ships an async httpx transport; the ``replicate`` client (and many others)
use a synchronous ``httpx.Client``, so this is the same idea for them:

    transport = X402Transport(client)           # an x402ClientSync with a signer registered
    replicate.Client(base_url=..., transport=transport)

With ``siwx_account`` (an eth-account account), a 401 that declares the x402
``sign-in-with-x`` extension is answered with a proof (listing the predictions this payer
bought): the EIP-4361 message of the declared fields, signed with EIP-191, sent as the SDK's
``SIWxPayload``. (The SDK's own message builder needs the optional ``siwe`` package.) ``receipts`` records every paid request and what came back,
so an agent can check that each payment bought its answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account.messages import encode_defunct
from x402 import x402ClientSync
from x402.extensions.sign_in_with_x import SIWxPayload, encode_siwx_header
from x402.http import x402HTTPClientSync

SIWX = "sign-in-with-x"


@dataclass(frozen=True)
class Receipt:
    """One paid request: where, the HTTP status it got, and the decoded ``PAYMENT-RESPONSE``."""

    method: str
    url: str
    status: int
    settlement: dict[str, Any] | None


class X402Transport(httpx.BaseTransport):
    """On a 402, sign a payment for the offered requirements and send the request once more."""

    def __init__(
        self,
        client: x402ClientSync,
        wrapped: httpx.BaseTransport | None = None,
        siwx_account: Any = None,
    ) -> None:
        self.client = client
        self.http = x402HTTPClientSync(client)
        self.wrapped = wrapped or httpx.HTTPTransport()
        self.siwx_account = siwx_account
        self.receipts: list[Receipt] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.wrapped.handle_request(request)
        if response.status_code == 401 and self.siwx_account is not None:
            return self._sign_in(request, response)
        if response.status_code != 402 or "PAYMENT-SIGNATURE" in request.headers:
            return response
        body = _json(response)
        required = self.http.get_payment_required_response(response.headers.get, body)
        headers = self.http.encode_payment_signature_header(self.client.create_payment_payload(required))
        paid = self.wrapped.handle_request(_again(request, headers))
        try:
            settlement = self.http.get_payment_settle_response(paid.headers.get).model_dump(
                by_alias=True, exclude_none=True
            )
        except ValueError:
            settlement = None
        self.receipts.append(Receipt(request.method, str(request.url), paid.status_code, settlement))
        return paid

    def _sign_in(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        """Answer a ``sign-in-with-x`` declaration with a proof for one of its chains."""
        declared = (_json(response) or {}).get("extensions", {}).get(SIWX)
        if not declared or "SIGN-IN-WITH-X" in request.headers:
            return response
        chain = next(c for c in declared["supportedChains"] if c["type"] == "eip191")
        fields = {
            **declared["info"],
            "address": self.siwx_account.address,
            "chainId": chain["chainId"],
            "type": chain["type"],
        }
        signed = self.siwx_account.sign_message(encode_defunct(text=eip4361(fields)))
        fields["signature"] = "0x" + bytes(signed.signature).hex()
        header = encode_siwx_header(SIWxPayload.model_validate(fields))
        return self.wrapped.handle_request(_again(request, {"SIGN-IN-WITH-X": header}))

    def close(self) -> None:
        self.wrapped.close()


def eip4361(fields: dict[str, Any]) -> str:
    """The EIP-4361 (Sign-In with Ethereum) message of a sign-in-with-x declaration's fields."""
    lines = [f"{fields['domain']} wants you to sign in with your Ethereum account:", fields["address"], ""]
    lines += [fields["statement"], ""] if fields.get("statement") else [""]
    lines += [
        f"URI: {fields['uri']}",
        f"Version: {fields['version']}",
        f"Chain ID: {fields['chainId'].split(':')[-1]}",
        f"Nonce: {fields['nonce']}",
        f"Issued At: {fields['issuedAt']}",
    ]
    optional = (("expirationTime", "Expiration Time"), ("notBefore", "Not Before"), ("requestId", "Request ID"))
    lines += [f"{label}: {fields[name]}" for name, label in optional if fields.get(name)]
    if fields.get("resources"):
        lines += ["Resources:", *[f"- {uri}" for uri in fields["resources"]]]
    return "\n".join(lines)


def _json(response: httpx.Response) -> Any:
    response.read()
    try:
        return json.loads(response.content or b"null")
    except ValueError:
        return None


def _again(request: httpx.Request, headers: dict[str, str]) -> httpx.Request:
    """The same request with ``headers`` added, keeping its extensions (its timeouts)."""
    return httpx.Request(
        request.method,
        request.url,
        headers={**request.headers, **headers},
        content=request.content,
        extensions=request.extensions,
    )
