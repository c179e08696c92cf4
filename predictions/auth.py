"""How an agent proves which payer it is, to list its own predictions: an EIP-191 signature
over ``x402 predictions <unix timestamp>``, fresh within five minutes."""

from __future__ import annotations

import time

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address
from rest_framework.exceptions import APIException, PermissionDenied
from rest_framework.request import Request

WINDOW_SECONDS = 300


class AuthenticationRequired(APIException):
    """401 (DRF turns its own NotAuthenticated into 403 when no authenticator is configured)."""

    status_code = 401
    default_detail = "Authentication required."


def message(timestamp: int) -> str:
    return f"x402 predictions {timestamp}"


def payer_of(request: Request) -> str:
    address = request.headers.get("X-Payer-Address", "")
    timestamp = request.headers.get("X-Payer-Timestamp", "")
    signature = request.headers.get("X-Payer-Signature", "")
    if not (address and timestamp and signature):
        raise AuthenticationRequired(
            "Listing needs an operator token, or X-Payer-Address, X-Payer-Timestamp and X-Payer-Signature "
            f"(EIP-191 signature of '{message(0).replace(' 0', ' <timestamp>')}')."
        )
    if not is_address(address) or not timestamp.isdigit():
        raise PermissionDenied("X-Payer-Address must be an address and X-Payer-Timestamp a unix time.")
    if abs(time.time() - int(timestamp)) > WINDOW_SECONDS:
        raise PermissionDenied("X-Payer-Timestamp is not within five minutes of now.")
    try:
        signer = Account.recover_message(encode_defunct(text=message(int(timestamp))), signature=signature)
    except Exception:  # noqa: BLE001 - any malformed signature is a refusal
        raise PermissionDenied("X-Payer-Signature is not a valid signature.") from None
    if signer != to_checksum_address(address):
        raise PermissionDenied("X-Payer-Signature was not made by X-Payer-Address.")
    return signer
