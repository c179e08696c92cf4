"""The reconciliation report (issue 20) on anvil: Transfers to pay-to beside the ledger."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone
from eth_account import Account

from payments.chain import batching
from payments.finance import chain_transfers, reconciliation
from payments.finance.reconciliation import LineStatus, Period
from payments.models import ChainTransfer, Payment, ReconciliationNote, ScannedRange
from payments.options import configured
from tests.conftest import fresh_payer, option_settings, rpc
from tests.test_settlement import PRICE, record_payment, send_as

pytestmark = [pytest.mark.django_db(transaction=True)]


def start_period(chain) -> datetime:
    """A period that holds only this test's blocks: it starts a second after the chain's head,
    and the next block is stamped then (earlier tests share the session's chain)."""
    head = rpc(chain.rpc_url, "eth_getBlockByNumber", ["latest", False])
    start = int(head["timestamp"], 16) + 1
    rpc(chain.rpc_url, "evm_setNextBlockTimestamp", [hex(max(start, int(time.time())))])
    return datetime.fromtimestamp(start, UTC)


def transfer(chain, sender: str, to: str, amount: int) -> str:
    data = "0xa9059cbb" + to[2:].lower().rjust(64, "0") + hex(amount)[2:].rjust(64, "0")
    return send_as(chain, sender, chain.asset, data)


def settle_as_batch(payments: list[Payment]) -> None:
    sent = batching.run(configured()[0], force=True)
    assert batching.follow([tx.pk for tx in sent], wait_seconds=20) == []
    for p in payments:
        p.refresh_from_db()
        assert p.status == "confirmed", p


def ledger_row_without_its_transaction(chain, block: int) -> Payment:
    """A ledger row that says paid, with a transaction the chain never saw."""
    return Payment.objects.create(
        status="confirmed",
        x402_version=2,
        network=chain.network,
        asset=configured()[0].option.asset,
        payer=Account.create().address,
        pay_to=chain.pay_to,
        amount=PRICE,
        nonce="0x" + secrets.token_hex(32),
        valid_after=0,
        valid_before=2**40,
        signature="0x00",
        payload={},
        requirement={},
        resource="http://test/",
        request_fingerprint="f",
        settle_tx_hash="0x" + secrets.token_hex(32),
        block_number=block,
        settled_at=timezone.now(),
        confirmed_at=timezone.now(),
    )


def test_a_direct_transfer_and_a_ledger_row_without_its_transaction_are_flagged_the_rest_match(
    chain_settings, staff
) -> None:
    chain = chain_settings
    since = start_period(chain)
    twice = fresh_payer(chain)
    # One batch transaction settles four payments, two of them the same payer and amount.
    paid = [record_payment(twice["private_key"]), record_payment(twice["private_key"])]
    paid += [record_payment(fresh_payer(chain)["private_key"], price=PRICE + i) for i in (1, 2)]
    settle_as_batch(paid)
    direct = fresh_payer(chain)
    direct_tx = transfer(chain, direct["address"], chain.pay_to, 123_456)
    head = int(rpc(chain.rpc_url, "eth_blockNumber", []), 16)
    ghost = ledger_row_without_its_transaction(chain, head)
    period = Period(since, timezone.now() + timedelta(hours=1))

    reads: list[tuple[int, int]] = []
    real_rpc = chain_transfers.rpc

    def counting_rpc(url, method, params, timeout=None):
        if method == "eth_getLogs":
            reads.append((int(params[0]["fromBlock"], 16), int(params[0]["toBlock"], 16)))
        return real_rpc(url, method, params, timeout)

    chain_transfers.rpc = counting_rpc
    try:
        with override_settings(X402_LOG_SPAN_BLOCKS=2, **option_settings(chain)):
            report = reconciliation.report(period)
            assert reads and all(high - low < 2 for low, high in reads)  # bounded ranges
            scanned = len(reads)
            again = reconciliation.report(period)
            assert len(reads) == scanned  # the final blocks were read once and kept
    finally:
        chain_transfers.rpc = real_rpc

    assert again.lines == report.lines
    by_status = {s: [line for line in report.lines if line.status == s] for s in LineStatus}
    assert sorted(line.payment_id for line in by_status[LineStatus.MATCHED]) == sorted(p.pk for p in paid)
    assert {line.tx_hash for line in by_status[LineStatus.MATCHED]} == {paid[0].settle_tx_hash.lower()}
    [chain_only] = by_status[LineStatus.CHAIN_ONLY]
    assert (chain_only.tx_hash, chain_only.payer, chain_only.amount) == (
        direct_tx.lower(),
        direct["address"],
        123_456,
    )
    [ledger_only] = by_status[LineStatus.LEDGER_ONLY]
    assert ledger_only.payment_id == ghost.pk
    totals = {t.status: (t.count, t.amount) for t in report.totals()}
    assert totals[LineStatus.MATCHED] == (4, sum(p.amount_decimal for p in paid))
    assert totals[LineStatus.CHAIN_ONLY][0] == totals[LineStatus.LEDGER_ONLY][0] == 1
    assert ScannedRange.objects.exists() and ChainTransfer.objects.filter(tx_hash=direct_tx.lower()).exists()

    # The command agrees, and fails while an unmatched line has no note.
    args = ["--since", since.isoformat(), "--until", period.until.isoformat()]
    with pytest.raises(CommandError, match="2 unmatched lines without a note"):
        call_command("reconciliation_report", *args)

    # Finance annotates both from the admin page; the page and the command show the notes.
    page = staff["finance"].get(
        "/admin/payments/payment/reconciliation/", {"since": since.date().isoformat(), "tz": "UTC"}
    )
    assert page.status_code == 200 and page.context["report"].count(LineStatus.MATCHED) == 4
    assert b"line-chain_only" in page.content and chain_only.key.encode() in page.content
    for line, why in [(chain_only, "customer paid by hand, invoice 17"), (ledger_only, "test row")]:
        answer = staff["finance"].post(
            "/admin/payments/payment/reconciliation/", {"key": line.key, "reason": why, "since": since.date()}
        )
        assert answer.status_code == 302
    assert ReconciliationNote.objects.filter(author__username="finn").count() == 2
    assert (
        staff["operator"]
        .post("/admin/payments/payment/reconciliation/", {"key": chain_only.key, "reason": "x"})
        .status_code
        == 403
    )
    bad = staff["finance"].post(
        "/admin/payments/payment/reconciliation/", {"key": "log:nonsense", "reason": "x"}
    )
    assert bad.status_code == 302 and ReconciliationNote.objects.count() == 2
    call_command("reconciliation_report", *args, "--format", "csv")
    noted = reconciliation.report(period)
    assert not noted.unexplained
    assert [n.author for line in noted.lines for n in line.notes] == ["finn", "finn"]

    # The ledger row the chain does not back is not left for the ledger-versus-chain invariant.
    ReconciliationNote.objects.filter(payment=ghost).delete()
    ghost.delete()


def test_gaps_are_what_no_stored_range_covers() -> None:
    gaps = chain_transfers.gaps
    assert gaps([], 5, 9) == [(5, 9)]
    assert gaps([(0, 6)], 5, 9) == [(7, 9)]
    assert gaps([(6, 6), (8, 20)], 5, 9) == [(5, 5), (7, 7)]
    assert gaps([(1, 3), (4, 9)], 1, 9) == []
    assert gaps([(0, 100)], 5, 4) == []
