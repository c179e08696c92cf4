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

from django.db import transaction
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


def hold(
    verified: bs.VerifiedVoucher, price: int, reference: str, channel_pk: int, *, usage: dict[str, str] | None = None
) -> None:
    """Hold the voucher's channel for the request ``reference`` priced ``price`` (call inside the
    transaction that records the request): one request in flight per channel. The voucher must
    still be built on our charged total and within the balance; it is kept with the hold and
    becomes the voucher we claim with once the request is charged (``channel_pk``: its row, as
    the gate read it).

    One conditional UPDATE takes the hold (the row's lock serializes two requests on the
    channel: the second finds it held); only a refusal reads the row, to say why. Raises
    ChannelRejected: ``channel_busy`` (another request holds it), ``cumulative_amount_mismatch``
    (the corrective 402), ``cumulative_exceeds_balance``, ``channel_not_found``."""
    voucher = verified.payload.voucher
    key = bs.hex_of(verified.channel_id)
    base = voucher.max_claimable - price
    taken = Channel.objects.filter(
        pk=channel_pk,
        channel_id=key,
        held_by="",
        charged_cumulative=Decimal(base),
        balance__gte=Decimal(voucher.max_claimable),
    ).update(
        held_by=reference,
        held_price=Decimal(price),
        held_signature=bs.hex_of(voucher.signature),
        held_usage=usage or {},
        held_at=timezone.now(),
        version=F("version") + 1,
    )
    if taken:
        return
    channel = Channel.objects.filter(pk=channel_pk, channel_id=key).only("held_by", "charged_cumulative").first()
    if channel is None:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_NOT_FOUND)
    if channel.held_by:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_BUSY, "another request on this channel is in flight")
    if int(channel.charged_cumulative) != base:
        raise bs.ChannelRejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH)
    raise bs.ChannelRejected(bs.ErrorCode.CUMULATIVE_EXCEEDS_BALANCE)


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
) -> Charged:
    """Hold and charge at once (a request served as it was paid): ``amount`` (the measured cost,
    at most ``price``; 0 for a run that failed on our side) to the channel of a voucher verified
    for a request priced ``price``. Raises what :func:`hold` raises."""
    if not 0 <= amount <= price:
        raise ValueError(f"a charge must be between 0 and the price ({price}), not {amount}")
    reference = fingerprint or bs.hex_of(verified.payload.voucher.signature)[:64]
    channel_pk = Channel.objects.filter(channel_id=bs.hex_of(verified.channel_id)).values_list("pk", flat=True).first()
    if channel_pk is None:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_NOT_FOUND)
    with transaction.atomic():
        hold(verified, price, reference, channel_pk)
        charged = release(channel_pk, reference, amount, resource=resource, fingerprint=fingerprint)
    assert charged is not None
    return charged
