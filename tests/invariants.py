"""The ledger-versus-chain invariant, checked the way an auditor would: from raw chain reads,
with none of the settlement code's helpers.

For every ledger row:
- its authorization used on chain (``authorizationState``) => the row is SETTLED or CONFIRMED;
  or it is FAILED and the chain shows its nonce consumed without its Transfer (the payer
  canceled it, ``AuthorizationCanceled``, or spent the nonce on another authorization: an
  ``AuthorizationUsed`` whose transaction moved no Transfer of this payment);
- the row SETTLED or CONFIRMED => the receipt of its ``settle_tx_hash`` has status 1 and a
  ``Transfer(payer, pay_to, amount)`` log of its token, and the authorization is used;
- the row FAILED or EXPIRED => the authorization was never used to move money;
- no row is still open (verified, settling, lapsing) once its authorization has lapsed: the
  reconciler must have finished it.

Pay-per-second (``upto``) rows are judged the same way with Permit2's word for "used" (the
permit's nonce bit in ``nonceBitmap``), and besides: the charge never exceeds the signed
maximum, a paid row records the run seconds it was charged for, and its transaction was sent to
the upto proxy (the only way our relayer settles a permit).

For every refund:
- CONFIRMED => the receipt of its transaction has status 1 and a ``Transfer(refund wallet,
  payer, amount)`` log of its token, and its payment is SETTLED or CONFIRMED;
- FAILED => none of its transactions (the current one and every one its events name) moved
  such a Transfer;
- at most one of a refund's transactions moved it (a refund is paid at most once);
- OWED => no transaction of it exists on chain yet (nothing was sent before approval).
Nothing else passes.
"""

from __future__ import annotations

from typing import Any

import requests
from eth_utils import keccak

TRANSFER = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
CANCELED = "0x" + keccak(text="AuthorizationCanceled(address,bytes32)").hex()
USED = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
#: Seconds after validBefore by which the reconciler must have closed a row (its lapse margin, and slack).
CLOSE_WITHIN_SECONDS = 120
STATE = "0x" + keccak(text="authorizationState(address,bytes32)").hex()[:8]
NONCE_BITMAP = "0x" + keccak(text="nonceBitmap(address,uint256)").hex()[:8]
PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
PAID = {"settled", "confirmed"}
UNPAID = {"failed", "expired"}
OPEN = {"verified", "settling", "lapsing"}


def _call(url: str, method: str, params: list[Any]) -> Any:
    body = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=10).json()
    if "error" in body:
        raise RuntimeError(f"{method}: {body['error']}")
    return body["result"]


def _word(address: str) -> str:
    return "0x" + address[2:].lower().rjust(64, "0")


def authorization_used(url: str, asset: str, payer: str, nonce: str) -> bool:
    data = STATE + _word(payer)[2:] + nonce[2:].lower()
    return int(_call(url, "eth_call", [{"to": asset, "data": data}, "latest"]), 16) != 0


def permit_used(url: str, payer: str, nonce: str) -> bool:
    """Permit2's bit for this nonce (the ledger keeps a permit's uint256 nonce as 32-byte hex)."""
    value = int(nonce, 16)
    data = NONCE_BITMAP + _word(payer)[2:] + (value >> 8).to_bytes(32, "big").hex()
    return int(_call(url, "eth_call", [{"to": PERMIT2, "data": data}, "latest"]), 16) >> (value & 255) & 1 == 1


def sent_to_proxy(url: str, tx_hash: str | None) -> bool:
    tx = _call(url, "eth_getTransactionByHash", [tx_hash]) if tx_hash else None
    return bool(tx) and (tx.get("to") or "").lower() == UPTO_PROXY.lower()


def pays(url: str, tx_hash: str | None, asset: str, payer: str, pay_to: str, amount: int) -> bool:
    """The transaction succeeded and moved exactly ``amount`` of ``asset`` from payer to pay_to
    (for a refund: from the refund wallet to the payer)."""
    if not tx_hash or len(tx_hash) != 66:
        return False
    try:
        receipt = _call(url, "eth_getTransactionReceipt", [tx_hash])
    except RuntimeError:
        return False
    if not receipt or int(receipt["status"], 16) != 1:
        return False
    return any(
        log["address"].lower() == asset.lower()
        and [t.lower() for t in log["topics"]] == [TRANSFER, _word(payer), _word(pay_to)]
        and int(log["data"], 16) == amount
        for log in receipt["logs"]
    )


def consumed_elsewhere(url: str, asset: str, payer: str, nonce: str, pay_to: str, amount: int) -> bool:
    """The nonce was canceled, or used by a transaction that did not pay this payment."""
    logs = _call(
        url,
        "eth_getLogs",
        [
            {
                "address": asset,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": [[CANCELED, USED], _word(payer), nonce.lower()],
            }
        ],
    )
    return bool(logs) and all(
        log["topics"][0].lower() == CANCELED or not pays(url, log["transactionHash"], asset, payer, pay_to, amount)
        for log in logs
    )


def _our_hashes(p: Any) -> list[str]:
    tx = p.settlement_tx
    return [*([p.settle_tx_hash] if p.settle_tx_hash else []), *(tx.hashes if tx is not None else [])]


def violations(url: str) -> list[str]:
    """Every ledger row that the chain contradicts, described."""
    import time

    from payments.models import Payment

    found = []
    for p in Payment.objects.all():
        amount = int(p.amount)
        upto = p.maximum is not None
        used = permit_used(url, p.payer, p.nonce) if upto else authorization_used(url, p.asset, p.payer, p.nonce)
        paid = pays(url, p.settle_tx_hash, p.asset, p.payer, p.pay_to, amount)
        if upto:
            if amount > int(p.maximum):
                found.append(f"{p.pk} charges {amount}, above its signed maximum {p.maximum}")
            if p.status in PAID and (p.run_seconds is None or not sent_to_proxy(url, p.settle_tx_hash)):
                found.append(f"{p.pk} is {p.status} but records no run seconds or was not settled by the proxy")
        if p.status in PAID and not (paid and used):
            found.append(f"{p.pk} is {p.status} but {p.settle_tx_hash} carries no Transfer of {amount} to pay-to")
        if (
            used
            and p.status not in PAID
            and not (
                p.status == "failed"
                and (
                    # upto: Permit2 logs nothing; the nonce spent by no transaction of ours for it
                    not any(pays(url, h, p.asset, p.payer, p.pay_to, amount) for h in _our_hashes(p))
                    if upto
                    else consumed_elsewhere(url, p.asset, p.payer, p.nonce, p.pay_to, amount)
                )
            )
        ):
            found.append(f"{p.pk} is {p.status} but its authorization was used on chain")
        if p.status in UNPAID and paid:
            found.append(f"{p.pk} is {p.status} but {p.settle_tx_hash} paid it")
        if p.status in OPEN and time.time() > p.valid_before + CLOSE_WITHIN_SECONDS:
            found.append(f"{p.pk} is still {p.status} long after its authorization lapsed")
    return found + refund_violations(url)


def refund_violations(url: str) -> list[str]:
    from payments.models import Refund

    found = []
    for r in Refund.objects.select_related("payment").prefetch_related("events"):
        moved = pays(url, r.tx_hash, r.asset, r.sender, r.recipient, int(r.amount)) if r.tx_hash else False
        # Every transaction ever signed for the refund (its SENT events name them): a refund is
        # paid at most once, and a failed one never.
        hashes = {r.tx_hash} | {e.detail["tx"] for e in r.events.all() if e.detail.get("tx")}
        paid = sorted(h for h in hashes if h and pays(url, h, r.asset, r.sender, r.recipient, int(r.amount)))
        if r.status == "confirmed" and not (moved and r.payment.status in PAID):
            found.append(f"refund {r.pk} is confirmed but {r.tx_hash} carries no Transfer of {r.amount} to the payer")
        if len(paid) > 1:
            found.append(f"refund {r.pk} was paid more than once: {', '.join(paid)}")
        if r.status == "failed" and paid:
            found.append(f"refund {r.pk} is failed but {', '.join(paid)} paid it")
        if r.status == "owed" and r.tx_hash and _call(url, "eth_getTransactionReceipt", [r.tx_hash]):
            found.append(f"refund {r.pk} is owed but its transaction {r.tx_hash} was mined")
    return found


def settle_the_ledger(passes: int = 6) -> None:
    """Let the reconciler finish what it can (as its beat would), until nothing changes."""
    from payments.chain.settlement import reconcile_open
    from payments.models import Payment

    before = None
    for _ in range(passes):
        reconcile_open()
        now = list(Payment.objects.order_by("pk").values_list("pk", "status", "settle_tx_hash"))
        if now == before:
            return
        before = now


def assert_ledger_agrees_with_chain(url: str) -> None:
    settle_the_ledger()
    found = violations(url)
    assert not found, "the ledger contradicts the chain:\n" + "\n".join(found)


CHANNELS_SELECTOR = "0x" + keccak(text="channels(bytes32)").hex()[:8]
RECEIVERS_SELECTOR = "0x" + keccak(text="receivers(address,address)").hex()[:8]
BATCH_SETTLEMENT = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"


def settled_for(url: str, pay_to: str, asset: str) -> int:
    """What the settlement contract says it settled to ``pay_to`` in ``asset``, ever."""
    answer = _call(url, "eth_call", [{"to": BATCH_SETTLEMENT, "data": RECEIVERS_SELECTOR + _word(pay_to)[2:] + _word(asset)[2:]}, "latest"])
    return int(answer[66:130], 16)


def channel_violations(url: str, pay_to: str, asset: str, settled_before: int = 0) -> list[str]:
    """The channels' ledger against the settlement contract, read raw:

    - per channel: the charges add up to our charged total, each on the one before it (no
      voucher charged twice); what we charged is within the payer's highest voucher and what the
      channel ever held; the chain's claimed total is what we say it is, at most what we charged,
      and falls on a charge's cumulative (claimed on chain == the sum of the charges claimed);
    - pay-to: every mined settle's receipt moved exactly its amount from the contract to pay-to,
      and all settles together moved what the contract says was settled for pay-to since
      ``settled_before`` (its figure when the ledger was empty);
    - nothing charged while no channel balance was there to pay it."""
    from payments.channels.models import Channel, ChannelTx, ChannelTxStatus
    from payments.models import SettlementTx

    problems: list[str] = []
    for channel in Channel.objects.all():
        answer = _call(url, "eth_call", [{"to": BATCH_SETTLEMENT, "data": CHANNELS_SELECTOR + channel.channel_id[2:]}, "latest"])
        balance, claimed = int(answer[2:66], 16), int(answer[66:130], 16)
        charges = list(channel.charges.order_by("cumulative"))
        running = 0
        for c in charges:
            running += int(c.amount)
            if int(c.cumulative) != running:
                problems.append(f"channel {channel.channel_id}: charge {c.pk} cumulative {c.cumulative} != {running}")
            if int(c.cumulative) > int(c.max_claimable):
                problems.append(f"channel {channel.channel_id}: charge {c.pk} above its voucher")
        if running != int(channel.charged_cumulative):
            problems.append(f"channel {channel.channel_id}: charges {running} != charged total {channel.charged_cumulative}")
        if int(channel.charged_cumulative) > int(channel.signed_max_claimable):
            problems.append(f"channel {channel.channel_id}: charged above the payer's highest voucher")
        if claimed != int(channel.total_claimed):
            problems.append(f"channel {channel.channel_id}: chain claimed {claimed} != mirror {channel.total_claimed}")
        if claimed > running:
            problems.append(f"channel {channel.channel_id}: chain claimed {claimed} > charged {running}")
        if claimed and claimed not in {int(c.cumulative) for c in charges}:
            problems.append(f"channel {channel.channel_id}: chain claimed {claimed} is on no charge's cumulative")
        if running > balance + claimed + int(channel.refunded) and running > 0:
            problems.append(f"channel {channel.channel_id}: charged {running} more than the channel ever held")
    settles = ChannelTx.objects.filter(tx__kind=SettlementTx.Kind.CHANNEL_SETTLE, status=ChannelTxStatus.MINED)
    total = 0
    for s in settles.select_related("tx"):
        receipt = _call(url, "eth_getTransactionReceipt", [s.tx.tx_hash])
        moved = sum(
            int(log["data"], 16)
            for log in receipt["logs"]
            if log["address"].lower() == asset.lower()
            and [t.lower() for t in log["topics"]] == [TRANSFER, _word(BATCH_SETTLEMENT), _word(pay_to)]
        )
        if moved != int(s.amount):
            problems.append(f"settle {s.tx.tx_hash}: moved {moved} to pay-to, the ledger says {s.amount}")
        total += moved
    settled_on_chain = settled_for(url, pay_to, asset) - settled_before
    if total != settled_on_chain:
        problems.append(f"pay-to: settles moved {total}, the contract says {settled_on_chain} settled")
    return problems
