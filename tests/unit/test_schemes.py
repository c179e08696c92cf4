"""Schemes are plug-ins: a third scheme, registered by a test, is offered in the 402 and its
payments are parsed, verified and checked on chain through the registry, with no change to the
gate, the wire types or verification."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from payments import schemes, verification
from payments.chain.node import PayerState
from payments.options import ConfiguredOption, configured
from payments.permissions import Charge, challenge_for
from payments.x402 import mechanisms
from payments.x402.types import (
    PaymentPayload,
    Requirement,
    Resource,
    parse_authorization,
    parse_payload,
    payment_required_v1,
)
from payments.x402.verify import VerifiedPayment

TOY = "toy"


class ToyWire:
    """The toy's wire side: v2 only, an EIP-3009-shaped payload, every payload valid."""

    name = TOY
    versions = frozenset({2})

    def extra(self, req: Requirement) -> dict[str, str]:
        return {"toyNote": "plug-in"}

    def parse(self, obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any] | None) -> PaymentPayload:
        return parse_authorization(obj, payload, accepted)

    def verify(self, payload: PaymentPayload, requirements: list[Requirement], now: int, **checks: Any) -> VerifiedPayment:
        return VerifiedPayment(requirement=next(r for r in requirements if r.scheme == TOY), payload=payload)

    def digest(self, verified: VerifiedPayment) -> bytes:
        return bytes(32)


class ToyScheme:
    """The toy's side with the chain: one atomic unit per option, a chain that always says yes."""

    name = TOY
    wire = ToyWire()
    usage_priced = False
    batches = False
    facilitator_api = False

    def offers(self, charge: Charge, price: Decimal) -> list[Requirement]:
        return [Requirement(c.option, 1, scheme=TOY) for c in configured()]

    def chain_state(self, conf: ConfiguredOption, verified: VerifiedPayment, contract: Any) -> PayerState:
        return PayerState(balance=1, nonce_used=False, block=4242)

    def settlement_call(self, p: Any, *, held: bool = False) -> Any:
        raise NotImplementedError

    def held_call(self, verified: VerifiedPayment) -> Any:
        raise NotImplementedError

    def last_usable_second(self, valid_before: int) -> int:
        return valid_before

    def transfer_matches(self, receipt: dict[str, Any], p: Any) -> bool:
        return False

    def chain_use(self, p: Any, conf: ConfiguredOption) -> Any:
        raise NotImplementedError


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ToyScheme]:
    mechanisms.names()  # the built-in schemes are registered before the registry is copied
    monkeypatch.setattr(mechanisms, "_registry", dict(mechanisms._registry))
    before = dict(schemes.SCHEMES)
    scheme = schemes.register(ToyScheme())
    try:
        yield scheme
    finally:
        schemes.SCHEMES.clear()
        schemes.SCHEMES.update(before)


def test_a_third_scheme_is_one_module_and_a_registration(toy: ToyScheme, offline_options: Any) -> None:
    resource = Resource(url="https://example.test/v1/things")
    challenge = challenge_for(Charge(price=Decimal("0.01"), resource=resource, fingerprint="f"))
    offered = [r for r in challenge.requirements if r.scheme == TOY]
    assert len(offered) == len(configured()) == 1
    wire = offered[0].v2()
    assert wire["scheme"] == TOY and wire["extra"]["toyNote"] == "plug-in"
    # v1 clients are offered only the schemes v1 carries.
    assert TOY not in {r["scheme"] for r in payment_required_v1(challenge.requirements, resource, "")["accepts"]}

    authorization = {
        "from": "0x" + "aa" * 20,
        "to": offered[0].option.pay_to,
        "value": "1",
        "validAfter": "0",
        "validBefore": "9999999999",
        "nonce": "0x" + "01" * 32,
    }
    payload = parse_payload(
        {"x402Version": 2, "accepted": wire, "payload": {"authorization": authorization, "signature": "0x" + "11" * 65}}
    )
    assert payload.scheme == TOY
    checked = verification.verify(payload, challenge.requirements, resource)
    assert checked.payment.requirement == offered[0]
    assert checked.block == 4242  # the toy's chain reads, found through the registry


def test_a_scheme_name_is_registered_once(toy: ToyScheme) -> None:
    with pytest.raises(ValueError):
        schemes.register(type("Impostor", (ToyScheme,), {})())  # one implementation per name
