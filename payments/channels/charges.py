"""Charging requests on a channel: the one writer of what we charged.

The gate verifies a voucher against a snapshot of the mirror (``batch_settlement.verify_payload``:
its ceiling is our charged total plus the price). A request it admits holds the channel
(:func:`hold`, in the transaction that records the request): the row is locked, the voucher must
still be built on our charged total, and no other request may be in flight on the channel
(``channel_busy``). When the request ends, :func:`release` charges what it cost (its price, the
measured cost, or 0 when it failed on our side), never above what the payer signed nor the
channel's balance (the pure ``charge``), and frees the channel; the charge's ledger row and the
new mirror are written in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from django.db import DatabaseError, transaction
from django.db.models import F
from django.utils import timezone

from payments.channels.models import Channel, ChannelCharge
from payments.x402 import batch_settlement as bs

log = logging.getLogger("payments.channels")


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


def hold(
    verified: bs.VerifiedVoucher,
    price: int,
    reference: str,
    *,
    usage: dict[str, str] | None = None,
    wait: bool = False,
) -> int:
    """Hold the voucher's channel for the request ``reference`` priced ``price`` (call inside the
    transaction that records the request): one request in flight per channel. The voucher must
    still be built on our charged total and within the balance; it is kept with the hold and
    becomes the voucher we claim with once the request is charged. The channel's row id.
    Raises ChannelRejected:
    ``channel_busy`` (another request holds it, or is charging it), ``cumulative_amount_mismatch``
    (the corrective 402), ``cumulative_exceeds_balance``, ``channel_not_found``."""
    voucher = verified.payload.voucher
    channel = _lock(bs.hex_of(verified.channel_id), wait)
    if channel.held_by:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_BUSY, "another request on this channel is in flight")
    mirror = channel.mirror
    if voucher.max_claimable - price != mirror.charged_cumulative:
        raise bs.ChannelRejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH)
    if voucher.max_claimable > mirror.balance:
        raise bs.ChannelRejected(bs.ErrorCode.CUMULATIVE_EXCEEDS_BALANCE)
    Channel.objects.filter(pk=channel.pk).update(
        held_by=reference,
        held_price=Decimal(price),
        held_signature=bs.hex_of(voucher.signature),
        held_usage=usage or {},
        held_at=timezone.now(),
        version=F("version") + 1,
    )
    return channel.pk


def release(
    channel_pk: int,
    reference: str,
    amount: Callable[[int, dict[str, str]], int] | int,
    *,
    resource: str = "",
    fingerprint: str = "",
) -> Charged | None:
    """End the hold of request ``reference``: charge ``amount`` (at most its price; 0 for a run
    that failed on our side, the payer's next voucher then carries the same cumulative; or a
    function of the held price and usage snapshot, for a request paid per second) and free the
    channel, in one transaction with the charge's ledger row. None when the channel is not held
    for ``reference`` (released already: a second end changes nothing)."""
    with transaction.atomic():
        channel = Channel.objects.select_for_update().get(pk=channel_pk)
        if channel.held_by != reference:
            return None
        price = int(channel.held_price)
        if callable(amount):
            amount = amount(price, channel.held_usage)
        if not 0 <= amount <= price:
            raise ValueError(f"a charge must be between 0 and the price ({price}), not {amount}")
        mirror = channel.mirror
        left = max(mirror.balance - mirror.charged_cumulative, 0)
        if amount > left:
            # The balance shrank while the request ran (a withdrawal finalized): what is left is
            # charged, the rest is lost; the end of the request must not fail for it.
            log.warning("channel %s: charge of %s cut to the %s left in it", channel.channel_id, amount, left)
            amount = left
        signature = bytes.fromhex(channel.held_signature[2:])
        voucher = bs.Voucher(channel.id_bytes, mirror.charged_cumulative + price, signature)
        after = bs.charge(mirror, voucher, amount) if amount else mirror
        Channel.objects.filter(pk=channel.pk).update(
            charged_cumulative=Decimal(after.charged_cumulative),
            signed_max_claimable=Decimal(after.signed_max_claimable),
            voucher_signature=bs.hex_of(after.signature) if after.signature else "",
            held_by="",
            held_price=Decimal(0),
            held_signature="",
            held_usage={},
            held_at=None,
            version=F("version") + 1,
        )
        row = None
        if amount:
            row = ChannelCharge.objects.create(
                channel=channel,
                amount=Decimal(amount),
                cumulative=Decimal(after.charged_cumulative),
                max_claimable=Decimal(voucher.max_claimable),
                resource=resource[:2000],
                fingerprint=fingerprint[:64],
                reference=reference[:64],
            )
    return Charged(after, row)


def charge_voucher(
    verified: bs.VerifiedVoucher,
    amount: int,
    *,
    price: int,
    resource: str = "",
    fingerprint: str = "",
    wait: bool = False,
) -> Charged:
    """Hold and charge at once (a request served as it was paid): ``amount`` (the measured cost,
    at most ``price``; 0 for a run that failed on our side) to the channel of a voucher verified
    for a request priced ``price``. Raises what :func:`hold` raises."""
    if not 0 <= amount <= price:
        raise ValueError(f"a charge must be between 0 and the price ({price}), not {amount}")
    reference = fingerprint or bs.hex_of(verified.payload.voucher.signature)[:64]
    with transaction.atomic():
        channel_pk = hold(verified, price, reference, wait=wait)
        charged = release(channel_pk, reference, amount, resource=resource, fingerprint=fingerprint)
    assert charged is not None
    return charged
