"""The gate's side of ``batch-settlement``: what a 402 offers, and taking a channel payment.

A 402 offers one ``batch-settlement`` requirement per payment option (receiver = pay-to, our
receiverAuthorizer, the withdraw delay we require, ``minDeposit``). A payment on it is checked
here without the chain for a voucher on a channel we mirror: the payload is parsed and bound to
its channel id, checked against our terms and our mirror (``batch_settlement.verify_payload``:
the EOA voucher signature, cumulative = our charged total + the price, within the balance). A
``deposit`` is relayed first by our lanes (the payer pays no gas) and the request waits until it
is mined; a voucher from a contract signer (EIP-1271) is asked of the chain. A channel another
request holds is ``channel_busy``; a voucher not built on our charged total gets the corrective
402 (``channelState``/``voucherState``) the SDK client resynchronises from. The request then
holds the channel (``charges.hold``, in the transaction that records the prediction) and is
charged when it ends (``charges.release``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from payments.chain.node import ChainUnavailable, RpcError, rpc
from payments.channels import charges, outbox, state
from payments.channels.models import Channel, ChannelTxStatus
from payments.exceptions import ServiceUnavailable
from payments.options import ConfiguredOption, configured
from payments.x402 import batch_settlement as bs
from payments.x402.types import Requirement, settle_response
from x402site.conf import x402

if TYPE_CHECKING:
    from payments.exceptions import Challenge, PaymentRequired

log = logging.getLogger("payments.channels")

#: Seconds a payer is told to wait before retrying on a busy channel.
BUSY_RETRY_AFTER = 1


def enabled() -> bool:
    """402s offer channels: switched on (``X402_CHANNELS``) with a receiverAuthorizer to claim with."""
    return x402.channels.enabled and bool(x402.channels.authorizer_key)


def terms(conf: ConfiguredOption) -> bs.ChannelTerms:
    """The channel we accept on ``conf``'s option: pay-to receives, our key authorizes."""
    return bs.ChannelTerms(
        chain_id=conf.option.chain_id,
        token=bytes.fromhex(conf.option.asset[2:]),
        receiver=bytes.fromhex(conf.option.pay_to[2:]),
        receiver_authorizer=bytes.fromhex(outbox.authorizer().address[2:]),
        withdraw_delay=x402.channels.withdraw_delay_seconds,
    )


def _terms_extra(conf: ConfiguredOption) -> tuple[tuple[str, Any], ...]:
    extra = terms(conf).extra(conf.option.asset_name, conf.option.asset_version, x402.channels.min_deposit)
    return tuple(extra.items())


def offers(amounts: list[tuple[ConfiguredOption, int]]) -> list[Requirement]:
    """The ``batch-settlement`` requirements for a request costing ``amount`` on each option."""
    return [
        Requirement(conf.option, amount, scheme=bs.SCHEME_BATCH_SETTLEMENT, terms=_terms_extra(conf))
        for conf, amount in amounts
    ]


def requirement_for(challenge: Challenge, accepted: dict[str, Any]) -> Requirement:
    """The challenge's channel requirement the payload says it accepted: the one with its
    network, token, pay-to and amount, else the first on its network (whose terms the channel
    then fails to match, with the precise reason); ``network_mismatch`` when none is on it."""
    ours = [r for r in [*challenge.requirements, *challenge.honoured] if r.scheme == bs.SCHEME_BATCH_SETTLEMENT]
    on_network = [r for r in ours if accepted.get("network") == r.option.network]
    for req in on_network:
        if (
            str(accepted.get("asset", "")).lower() == req.option.asset.lower()
            and str(accepted.get("payTo", "")).lower() == req.option.pay_to.lower()
            and str(accepted.get("amount")) == str(req.amount)
        ):
            return req
    if not on_network:
        raise bs.ChannelRejected(bs.ErrorCode.NETWORK_MISMATCH, "no channel requirement of ours on this network")
    return on_network[0]


def _conf_of(req: Requirement) -> ConfiguredOption:
    return next(c for c in configured() if c.option == req.option)


@dataclass(frozen=True, slots=True)
class ChannelPayment:
    """A channel payment the gate let through: the voucher, the price it pays, and the deposit
    relayed with it (its transaction hash), if any."""

    verified: bs.VerifiedVoucher
    price: int
    network: str
    payer: str
    #: Our row of the channel, as the gate read it.
    channel_pk: int
    deposit_tx: str = ""
    deposit_amount: int = 0
    #: The token's decimals (a per-second charge is computed in its units).
    decimals: int = 6

    @property
    def channel_id(self) -> str:
        return bs.hex_of(self.verified.channel_id)


#: How old our mirror of a channel may be when a voucher is checked against it (the spec's
#: "fresh enough"): older, the channel is read from the chain first (one JSON-RPC batch), so a
#: withdrawal finalized or a balance claimed elsewhere is seen within this.
STATE_TTL = timedelta(seconds=30)
#: A channel whose timed withdrawal finalizes within this takes no more vouchers: what it would
#: be charged might not be claimed before the balance leaves (the sweep claims at once when a
#: withdrawal starts, and at least every sweep interval after).
WITHDRAWAL_MARGIN = timedelta(minutes=5)


def _mirror(conf: ConfiguredOption, payload: bs.ChannelPayload) -> tuple[Channel | None, bs.ChannelMirror]:
    """Our row and mirror of the payload's channel, read from the chain when older than
    :data:`STATE_TTL`; a channel new to us is read from the chain (zeros for one that does not
    exist yet). ``channel_busy`` while another request holds it; a withdrawal about to finalize
    takes no more vouchers."""
    key = bs.hex_of(payload.voucher.channel_id)
    channel = Channel.objects.filter(channel_id=key).first()
    try:
        if channel is None:
            (found,) = state.read_channels(conf.rpc_url, [payload.voucher.channel_id])
            return None, bs.ChannelMirror.from_chain(found.balance, found.total_claimed, 0, found.refund_nonce)
        if channel.held_by:
            raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_BUSY, "another request on this channel is in flight")
        if channel.chain_read_at is None or timezone.now() - channel.chain_read_at > STATE_TTL:
            (channel,) = state.refresh_from_chain(conf.rpc_url, [channel])
    except (RpcError, ChainUnavailable) as exc:
        raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_STATE_READ_FAILED, str(exc)) from None
    refuse_if_leaving(channel)
    return channel, channel.mirror


def refuse_if_leaving(channel: Channel) -> None:
    """A channel whose timed withdrawal finalizes within :data:`WITHDRAWAL_MARGIN` is refused."""
    finalize = channel.withdraw_finalize_after
    if finalize is not None and finalize <= timezone.now() + WITHDRAWAL_MARGIN:
        raise bs.ChannelRejected(
            bs.ErrorCode.CUMULATIVE_EXCEEDS_BALANCE,
            f"a timed withdrawal of this channel finalizes at {finalize.isoformat()}: open a new channel",
        )


def _contract_signature_approved(conf: ConfiguredOption, payload: bs.ChannelPayload) -> None:
    """A channel whose payer is a contract wallet (no payerAuthorizer): the wallet, asked on
    chain (EIP-1271 ``isValidSignature`` at ``payer``), must approve the voucher's signature.
    Asked before anything about the channel's state is checked or told."""
    config, voucher = payload.config, payload.voucher
    digest = bs.voucher_digest(voucher.channel_id, voucher.max_claimable, conf.option.chain_id)
    data = "0x1626ba7e" + digest.hex() + (64).to_bytes(32, "big").hex() + len(voucher.signature).to_bytes(32, "big").hex()
    data += voucher.signature.hex().ljust(((len(voucher.signature) + 31) // 32) * 64, "0")
    try:
        answer = rpc(conf.rpc_url, "eth_call", [{"to": bs.checksum(config.payer), "data": data}, "latest"])
    except (RpcError, ChainUnavailable):
        raise bs.ChannelRejected(bs.ErrorCode.VOUCHER_SIGNATURE, "the wallet did not approve the voucher") from None
    if not str(answer).startswith("0x1626ba7e"):
        raise bs.ChannelRejected(bs.ErrorCode.VOUCHER_SIGNATURE, "the wallet did not approve the voucher")


#: A deposit authorization must stay valid this long after we relay it (mined at depth).
DEPOSIT_VALIDITY_MARGIN = 30


def _check_deposit(payload: bs.DepositPayload, mirror: bs.ChannelMirror) -> None:
    """A deposit we relay (our gas) must be usable now and for a while, and a new channel's
    first deposit at least the ``minDeposit`` we offer."""
    now = int(time.time())
    auth = payload.deposit
    if auth.valid_after > now:
        raise bs.ChannelRejected(bs.ErrorCode.VALID_AFTER, "the deposit authorization is not valid yet")
    if auth.valid_before < now + DEPOSIT_VALIDITY_MARGIN:
        raise bs.ChannelRejected(bs.ErrorCode.VALID_BEFORE, "the deposit authorization expires too soon")
    if mirror.balance == 0 and auth.amount < x402.channels.min_deposit:
        raise bs.ChannelRejected(
            bs.ErrorCode.DEPOSIT_PAYLOAD, f"a new channel's first deposit is at least {x402.channels.min_deposit}"
        )


def wait_for(tx_pk: int, seconds: float) -> str:
    """Follow a channel transaction (``outbox.track``) until it is mined, reverted or dropped,
    for at most ``seconds``; its status then (SENT: still out)."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        status = outbox.track(tx_pk)
        if status != ChannelTxStatus.SENT or time.monotonic() > deadline:
            return status
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def accept(obj: dict[str, Any], challenge: Challenge) -> ChannelPayment:
    """Check a decoded ``batch-settlement`` payment header against ``challenge`` (relaying its
    deposit first). Raises PaymentRequired: the scheme's reason, or the corrective 402."""
    try:
        return _accept(obj, challenge)
    except (ChainUnavailable, RpcError) as exc:  # the chain did not answer: nothing was decided
        log.warning("channel payment not checked: the chain did not answer (%s)", exc)
        raise ServiceUnavailable() from None
    except bs.ChannelRejected as exc:
        log.info("channel payment refused: %s (%s)", exc.code, exc.message)
        payload = obj.get("payload")
        voucher = payload.get("voucher") if isinstance(payload, dict) else None
        channel_id = voucher.get("channelId") if isinstance(voucher, dict) else None
        raise rejection(challenge, exc, channel_id if isinstance(channel_id, str) else None) from None


def _accept(obj: dict[str, Any], challenge: Challenge) -> ChannelPayment:
    accepted = obj.get("accepted")
    if obj.get("x402Version") != 2 or not isinstance(accepted, dict):
        raise bs.ChannelRejected(bs.ErrorCode.SCHEME, "batch-settlement is an x402 v2 scheme")
    req = requirement_for(challenge, accepted)
    conf = _conf_of(req)
    payload = bs.parse_payload(obj.get("payload"), conf.option.chain_id)
    if isinstance(payload, bs.RefundPayload):
        raise bs.ChannelRejected(bs.ErrorCode.PAYLOAD_TYPE, "a refund goes to /v1/channels/refund")
    our_terms = terms(conf)
    our_terms.check(payload.config)
    if payload.config.contract_signer:
        _contract_signature_approved(conf, payload)
    channel, mirror = _mirror(conf, payload)
    verified = bs.verify_payload(payload, our_terms, mirror, req.amount)
    payer = bs.checksum(payload.config.payer)
    if not isinstance(payload, bs.DepositPayload):
        if channel is None:
            # A channel we never saw but the chain holds (our record was lost): adopted, with
            # its claimed total as the baseline, then checked against that.
            channel = state.channel_for(conf.rpc_url, conf.option.network, payload.config, payload.voucher.channel_id)
            verified = bs.verify_payload(payload, our_terms, channel.mirror, req.amount)
        return ChannelPayment(verified, req.amount, conf.option.network, payer, channel.pk, decimals=conf.option.decimals)
    # A deposit: relayed by our lane (simulated first: a bad authorization is refused here),
    # and waited for, so that the voucher it carries is charged against money in escrow.
    _check_deposit(payload, mirror)
    tx = outbox.deposit(conf, payload)
    status = wait_for(tx.pk, x402.channels.tx_wait_seconds)
    if status != ChannelTxStatus.MINED:
        raise bs.ChannelRejected(bs.ErrorCode.DEPOSIT_TRANSACTION_FAILED, f"the deposit transaction {tx.tx_hash} is {status}")
    channel = Channel.objects.get(channel_id=bs.hex_of(payload.voucher.channel_id))
    voucher_only = bs.VoucherPayload(payload.config, payload.voucher)
    verified = bs.verify_payload(voucher_only, our_terms, channel.mirror, req.amount)
    return ChannelPayment(
        verified, req.amount, conf.option.network, payer, channel.pk, tx.tx_hash, payload.deposit.amount, conf.option.decimals
    )


def refund(obj: dict[str, Any], challenge: Challenge) -> dict[str, Any]:
    """A cooperative refund (``type: refund``): the payer's voucher at our charged total says
    it agrees with what we charged; what we charged and did not claim is claimed and the rest
    (or the ``amount`` asked for) returned in one transaction through our lane, waited for. The
    ``PAYMENT-RESPONSE`` (its transaction, the channel after it). Raises PaymentRequired."""
    channel_id = None
    try:
        accepted = obj.get("accepted")
        if obj.get("x402Version") != 2 or not isinstance(accepted, dict):
            raise bs.ChannelRejected(bs.ErrorCode.SCHEME, "batch-settlement is an x402 v2 scheme")
        conf = _conf_of(requirement_for(challenge, accepted))
        payload = bs.parse_payload(obj.get("payload"), conf.option.chain_id)
        channel_id = bs.hex_of(payload.voucher.channel_id)
        if not isinstance(payload, bs.RefundPayload):
            raise bs.ChannelRejected(bs.ErrorCode.PAYLOAD_TYPE, "only a refund is taken here")
        channel = Channel.objects.filter(channel_id=channel_id).first()
        if channel is None:
            raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_NOT_FOUND)
        terms(conf).check(payload.config)
        if payload.config.contract_signer:
            _contract_signature_approved(conf, payload)
        if channel.held_by:
            raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_BUSY, "a request on this channel is in flight")
        bs.verify_payload(payload, terms(conf), channel.mirror, 0)
        tx = outbox.refund(conf, channel_id, payload.amount)
        status = wait_for(tx.pk, x402.channels.tx_wait_seconds)
        if status != ChannelTxStatus.MINED:
            raise bs.ChannelRejected(bs.ErrorCode.REFUND_TRANSACTION_FAILED, f"the refund transaction {tx.tx_hash} is {status}")
    except (ChainUnavailable, RpcError) as exc:
        log.warning("channel refund not done: the chain did not answer (%s)", exc)
        raise ServiceUnavailable() from None
    except bs.ChannelRejected as exc:
        log.info("channel refund refused: %s (%s)", exc.code, exc.message)
        raise rejection(challenge, exc, channel_id) from None
    channel.refresh_from_db()
    returned = int(tx.channel_txs.get(channel=channel).amount)
    body = settle_response(
        success=True, transaction=tx.tx_hash, network=channel.network, payer=channel.payer, amount=returned
    )
    body["extra"] = {"channelState": channel.mirror.channel_state(channel.id_bytes)}
    return body


def rejection(challenge: Challenge, exc: bs.ChannelRejected, channel_id: str | None = None) -> PaymentRequired:
    """The 402 for a refused channel payment; for ``cumulative_amount_mismatch`` (and
    ``cumulative_below_claimed``) the channel requirement carries our state of ``channel_id``
    and the payer's latest voucher (the corrective 402); ``channel_busy`` asks for a retry."""
    corrected = challenge
    if exc.code in (bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH, bs.ErrorCode.CUMULATIVE_BELOW_CLAIMED) and channel_id:
        corrected = _corrective(challenge, channel_id) or challenge
    refused = corrected.reject(exc.code.value, exc.message or exc.code.value)
    if exc.code == bs.ErrorCode.CHANNEL_BUSY:
        refused.retry_after = BUSY_RETRY_AFTER
    return refused


def _corrective(challenge: Challenge, channel_id: str) -> Challenge | None:
    channel = Channel.objects.filter(channel_id=channel_id.lower()).first()
    if channel is None:
        return None
    mirror = channel.mirror
    requirements = [
        replace(r, terms=tuple(mirror.corrective_extra(dict(r.terms), channel.id_bytes).items()))
        if r.scheme == bs.SCHEME_BATCH_SETTLEMENT and r.option.network == channel.network
        else r
        for r in challenge.requirements
    ]
    return replace(challenge, requirements=requirements)


def hold(paid: ChannelPayment, reference: str, challenge: Challenge, usage: dict[str, str] | None = None) -> int:
    """Hold the channel for the request ``reference`` (inside the transaction recording it; a
    request paid per second keeps its ``usage`` price); the channel's row id. Raises
    PaymentRequired (busy, or the corrective 402 when another request was charged since the
    gate's check)."""
    try:
        charges.hold(paid.verified, paid.price, reference, paid.channel_pk, usage=usage)
    except bs.ChannelRejected as exc:
        raise rejection(challenge, exc, paid.channel_id) from None
    return paid.channel_pk


def answer(channel: Channel, reference: str, *, transaction_hash: str = "") -> dict[str, Any]:
    """The ``PAYMENT-RESPONSE`` of the request ``reference`` paid on ``channel``: success, what
    it was charged (``chargedAmount``) and the channel's charged total after it (``channelState``),
    as the SDK client reads them. A request still holding the channel reports what it is charged
    when served (its price); one that ended reports its charge (0 when it failed on our side:
    a client that counted the price is corrected by the next 402)."""
    if channel.held_by == reference:
        charged = int(channel.held_price)
        cumulative = int(channel.charged_cumulative) + charged
    else:
        row = channel.charges.filter(reference=reference).first()
        charged = int(row.amount) if row is not None else 0
        cumulative = int(row.cumulative) if row is not None else int(channel.charged_cumulative)
    mirror = replace(channel.mirror, charged_cumulative=cumulative)
    body = settle_response(success=True, transaction=transaction_hash, network=channel.network, payer=channel.payer)
    body["extra"] = {"chargedAmount": str(charged), "channelState": mirror.channel_state(channel.id_bytes)}
    return body
