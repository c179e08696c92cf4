"""Operations commands: settle_pending, reconcile, ledger_report."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from payments.models import Payment
from tests.conftest import rpc
from tests.test_settlement import record_payment, send_as

pytestmark = [pytest.mark.django_db(transaction=True)]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_settle_pending_then_reconcile_and_report(chain_settings) -> None:
    chain = chain_settings
    first_block = int(rpc(chain.rpc_url, "eth_blockNumber", []), 16) + 1
    payments = [record_payment(chain.payers[i]["private_key"]) for i in (0, 1)]
    out = run("settle_pending")
    assert out.count(": confirmed 0x") == 2
    assert set(Payment.objects.values_list("status", flat=True)) == {"confirmed"}

    assert "mismatches: 0" in run("reconcile", "--since", "2020-01-01")
    report = run("ledger_report", "--from-block", str(first_block))
    assert "on chain: 2 transfers, 0.02 USDC" in report and "agree" in report

    # Money that reached us outside the ledger shows up, and the command fails.
    stranger = chain.payers[2]["address"]
    send_as(
        chain,
        stranger,
        chain.asset,
        "0xa9059cbb" + chain.pay_to[2:].lower().rjust(64, "0") + hex(5)[2:].rjust(64, "0"),
    )
    with pytest.raises(CommandError):
        run("ledger_report", "--from-block", str(first_block))

    # A confirmed payment whose transaction the chain does not know is reported.
    real_hash = Payment.objects.get(pk=payments[0].pk).settle_tx_hash
    Payment.objects.filter(pk=payments[0].pk).update(settle_tx_hash="0x" + "ab" * 32)
    with pytest.raises(CommandError, match="disagree"):
        run("reconcile")
    Payment.objects.filter(pk=payments[0].pk).update(settle_tx_hash=real_hash)  # undo the forgery
