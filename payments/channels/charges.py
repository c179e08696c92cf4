"""Charging a request on a channel: the one writer of what we charged.

The gate verifies a voucher against a snapshot of the mirror (``batch_settlement.verify_payload``:
its ceiling is our charged total plus the price). Between that check and the charge another
request on the same channel may have been charged, so :func:`charge_voucher` locks the channel's
row and checks again: the voucher must still be built on our charged total, and the pure
``charge`` keeps the total within what the payer signed and the channel's balance. The charge's
ledger row and the new mirror are written in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db import DatabaseError, transaction
from django.db.models import F

from payments.channels.models import Channel, ChannelCharge
from payments.x402 import batch_settlement as bs


@dataclass(frozen=True, slots=True)
class Charged:
    """What a charge did: the mirror after it, and its ledger row (None for a zero charge)."""

    mirror: bs.ChannelMirror
    charge: ChannelCharge | None


def _lock(channel_id: str, wait: bool) -> Channel:
    """The channel's row, locked for this transaction. Without ``wait``, a row another request
    holds is ``channel_busy`` at once (the payer retries) rather than a queue of waiting requests."""
    rows = Channel.objects.select_for_update(nowait=not wait)
    try:
        return rows.get(channel_id=channel_id)
    except Channel.DoesNotExist:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_NOT_FOUND) from None
    except DatabaseError:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_BUSY) from None


def charge_voucher(
    verified: bs.VerifiedVoucher,
    amount: int,
    *,
    price: int,
    resource: str = "",
    fingerprint: str = "",
    wait: bool = False,
) -> Charged:
    """Charge ``amount`` (the measured cost, at most ``price``; 0 for a run that failed on our
    side) to the channel of a voucher verified for a request priced ``price``. Raises the
    scheme's ChannelRejected: ``cumulative_amount_mismatch`` when the voucher is no longer built
    on our charged total (replayed, or overtaken by a concurrent charge: the gate answers the
    corrective 402), ``charge_exceeds_signed_cumulative``, ``cumulative_exceeds_balance``,
    ``channel_busy``, ``channel_not_found``."""
    if not 0 <= amount <= price:
        raise ValueError(f"a charge must be between 0 and the price ({price}), not {amount}")
    voucher = verified.payload.voucher
    with transaction.atomic():
        channel = _lock(bs.hex_of(verified.channel_id), wait)
        mirror = channel.mirror
        if voucher.max_claimable - price != mirror.charged_cumulative:
            raise bs.ChannelRejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH)
        if amount == 0:  # nothing moves; the payer's next voucher carries the same cumulative
            return Charged(mirror, None)
        after = bs.charge(mirror, voucher, amount)
        Channel.objects.filter(pk=channel.pk).update(
            charged_cumulative=Decimal(after.charged_cumulative),
            signed_max_claimable=Decimal(after.signed_max_claimable),
            voucher_signature=bs.hex_of(after.signature),
            version=F("version") + 1,
        )
        row = ChannelCharge.objects.create(
            channel=channel,
            amount=Decimal(amount),
            cumulative=Decimal(after.charged_cumulative),
            max_claimable=Decimal(voucher.max_claimable),
            resource=resource[:2000],
            fingerprint=fingerprint[:64],
        )
    return Charged(after, row)
