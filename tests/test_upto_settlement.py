"""Settling ``upto`` payments on anvil under the faults a chain produces: a replaced settlement
whose replacement reverts after the payer spent the Permit2 nonce elsewhere."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from payments import ledger, verification
from payments.chain import devchain, evidence, lapsing, settlement, tracking
from payments.chain.calls import UseNotFound
from payments.chain.node import rpc
from payments.models import Payment, PaymentStatus, UnpaidReason
from payments.options import payment_options
from payments.pricing import UsagePrice
from payments.schemes.upto import permit_of
from payments.x402.permit2 import PERMIT2_ADDRESS
from payments.x402.types import SCHEME_UPTO, Requirement, Resource, parse_payload
from tests.conftest import fresh_payer, option_settings, token_balance, wait_mined
from tests.test_settlement import send_as
from tests.upto import sign_upto, upto_body

pytestmark = [pytest.mark.django_db(transaction=True)]
MAXIMUM = 14_000
CHARGE = 3_000
#: Permit2's invalidateUnorderedNonces(uint256 wordPos, uint256 mask): the payer spends a nonce.
INVALIDATE_UNORDERED_NONCES = "0x3ff9dcb1"


def record_verified_upto(chain, key: str, usage: UsagePrice | None = None) -> Payment:
    """A verified upto payment in the ledger (not yet charged): its maximum is ``usage``'s."""
    usage = usage or UsagePrice(Decimal("0.0014"), Decimal(0), Decimal(0), Decimal("0.014"))
    maximum = int(usage.maximum.scaleb(6))
    req = Requirement(
        payment_options()[0], maximum, hold_seconds=10, scheme=SCHEME_UPTO, facilitators=(chain.relayer_address,)
    )
    payload = parse_payload(upto_body(req, sign_upto(key, req)))
    resource = Resource("http://test/")
    verified = verification.verify(payload, [req], resource)
    with transaction.atomic():
        return ledger.record(verified, resource=resource, fingerprint="test", settle_now=False, usage=usage)


def record_upto(chain, key: str) -> Payment:
    """A verified upto payment in the ledger, charged CHARGE of MAXIMUM and asked to settle."""
    p = record_verified_upto(chain, key)
    Payment.objects.filter(pk=p.pk).update(amount=CHARGE, run_seconds=Decimal("2.1"), settle_requested_at=timezone.now())
    return Payment.objects.get(pk=p.pk)


def test_the_charge_is_the_measured_seconds_price_rounded_up_once(chain) -> None:
    """2.0005 s at 0.0014 USDC/s is 2,800.7 atomic units: charged 2,801 (rounding the seconds
    first, to 2.000 s, charged 2,800), the seconds recorded as measured, and exactly that moves."""
    with override_settings(**option_settings(chain)):
        payer = fresh_payer(chain)
        devchain.approve_permit2(chain.rpc_url, chain.asset, payer["address"])
        before = token_balance(chain, payer["address"])
        p = record_verified_upto(chain, payer["private_key"])
        with transaction.atomic():
            ledger.charge_usage(p, Decimal("2.0005"), ledger.RunEnd.SUCCEEDED)
        p.refresh_from_db()
        assert (int(p.amount), p.run_seconds) == (2_801, Decimal("2.0005"))
        p = settlement.settle(p.pk, wait_seconds=5)
    assert p.status in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED)
    assert token_balance(chain, payer["address"]) == before - 2_801


def test_a_replaced_settlement_whose_replacement_reverts_ends_failed(chain) -> None:
    """Our settle transaction is replaced (fee bump); the payer spends the Permit2 nonce
    elsewhere; the replacement mines and reverts. The replaced signature can never be mined
    (its nonce is spent): the payment ends FAILED (nonce used elsewhere), not LAPSING forever."""
    with override_settings(**option_settings(chain), X402_STUCK_AFTER_SECONDS=0):
        payer = fresh_payer(chain)
        devchain.approve_permit2(chain.rpc_url, chain.asset, payer["address"])
        before = token_balance(chain, payer["address"])
        p = record_upto(chain, payer["private_key"])
        rpc(chain.rpc_url, "anvil_setAutomine", [False])
        try:
            p = settlement.prepare(p.pk)
            settlement.broadcast(p)
            replaced = p.settle_tx_hash  # stuck in the pool: never mined
            tracking.reconcile_batch([p.pk])  # replaced with higher fees
            p.refresh_from_db()
            replacement = p.settle_tx_hash
            assert replacement != replaced and p.settlement_tx.replaced_hashes == [replaced]
            rpc(chain.rpc_url, "anvil_dropTransaction", [replacement])  # held back until the payer acted
        finally:
            rpc(chain.rpc_url, "anvil_setAutomine", [True])
        permit = permit_of(p)
        word, bit = permit.nonce_word.to_bytes(32, "big").hex(), permit.nonce_bit.to_bytes(32, "big").hex()
        send_as(chain, payer["address"], PERMIT2_ADDRESS, INVALIDATE_UNORDERED_NONCES + word + bit)
        settlement.broadcast(p)  # the replacement mines now, and reverts (the nonce is spent)
        wait_mined(chain.rpc_url, replacement)
        p = tracking.track(p.pk)
        assert rpc(chain.rpc_url, "eth_getTransactionReceipt", [replaced]) is None
        assert int(rpc(chain.rpc_url, "eth_getTransactionReceipt", [replacement])["status"], 16) == 0
        p = lapsing.resolve_lapsing(p.pk)
    assert p.status == PaymentStatus.FAILED, (p.status, p.failure_reason)
    assert p.unpaid_reason == UnpaidReason.NONCE_USED_ELSEWHERE
    assert token_balance(chain, payer["address"]) == before


def test_a_settlement_still_waiting_to_be_mined_is_not_called_unpaid(chain, monkeypatch) -> None:
    """The converse: the Permit2 nonce is spent while our (only) signature is still unmined with
    its lane nonce unspent. It may yet be the use: nothing is decided until its nonce is spent."""
    from payments.chain import relayer

    with override_settings(**option_settings(chain)):
        payer = fresh_payer(chain)
        devchain.approve_permit2(chain.rpc_url, chain.asset, payer["address"])
        p = record_upto(chain, payer["private_key"])
        p = settlement.prepare(p.pk)  # signed and stored, not broadcast
        permit = permit_of(p)
        word, bit = permit.nonce_word.to_bytes(32, "big").hex(), permit.nonce_bit.to_bytes(32, "big").hex()
        send_as(chain, payer["address"], PERMIT2_ADDRESS, INVALIDATE_UNORDERED_NONCES + word + bit)
        valid_before = p.valid_before
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: valid_before + evidence.LAPSE_MARGIN_SECONDS + 1)
            p = tracking.track(p.pk)  # not mined by validBefore (our clock): the chain decides
            assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.NOT_MINED
            with pytest.raises(UseNotFound):
                lapsing.resolve_lapsing(p.pk)
        p.refresh_from_db()
        assert p.status == PaymentStatus.LAPSING
        # Mined after all: it reverts (the nonce is spent), and its lane nonce is spent with it.
        relayer.broadcast(chain.rpc_url, p.settlement_tx)
        wait_mined(chain.rpc_url, p.settle_tx_hash)
        p = lapsing.resolve_lapsing(p.pk)
    assert p.status == PaymentStatus.FAILED and p.unpaid_reason == UnpaidReason.NONCE_USED_ELSEWHERE
