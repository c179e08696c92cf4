"""``upto``: pay per second. The payer signs a Permit2 witness transfer of at most a maximum;
the run is held, then settled for its charge through the x402 upto proxy, from the relayer
lane the permit names as its facilitator (never batched, never through a remote facilitator).
Its use is the nonce's bit in Permit2's bitmap."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from eth_utils import to_checksum_address

from payments.chain import relayer as relayers
from payments.chain.abi import NONCE_BITMAP, TRANSFER_TOPIC, UPTO_SETTLE, UPTO_SETTLE_TYPES
from payments.chain.calls import SettlementCall, UseNotFound, payment_hashes, succeeded, transfer_logs, word
from payments.chain.node import (
    AuthorizationUse,
    ChainUnavailable,
    PayerState,
    RpcError,
    permit2_state,
    rpc_batch,
)
from payments.models import Payment
from payments.options import ConfiguredOption, SettlementMode, configured, for_payment
from payments.pricing import atomic_amount
from payments.x402.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPermit
from payments.x402.types import Requirement, parse_payload
from payments.x402.upto import UPTO as WIRE
from payments.x402.verify import (
    PERMIT2_ALLOWANCE_REQUIRED,
    PERMIT2_INSUFFICIENT_BALANCE,
    PERMIT2_INVALID_SIGNATURE,
    PERMIT2_NONCE_USED,
    PaymentRejected,
    VerifiedPayment,
)

if TYPE_CHECKING:
    from payments.permissions import Charge

#: Gas limit for one upto proxy ``settle`` (Permit2 witness transfer; about 90,000 on anvil).
GAS_LIMIT = 200_000


def permit_of(p: Payment) -> UptoPermit:
    """The signed permit, from the payment's recorded payload."""
    permit = parse_payload(p.payload).permit
    if permit is None:
        raise ValueError(f"payment {p.pk} is upto but its payload holds no permit")
    return permit


def permit_calldata(permit: UptoPermit, amount: int, signature: bytes) -> str:
    """The upto proxy's ``settle(permit, amount, owner, witness, signature)`` for ``amount``."""
    from eth_abi import encode

    def address(raw: bytes) -> str:
        return to_checksum_address("0x" + raw.hex())

    args = [
        ((address(permit.token), permit.maximum), permit.nonce, permit.deadline),
        amount,
        address(permit.owner),
        (address(permit.to), address(permit.facilitator), permit.valid_after),
        signature,
    ]
    return "0x" + (UPTO_SETTLE + encode(UPTO_SETTLE_TYPES, args)).hex()


def _call(permit: UptoPermit, data: str) -> SettlementCall:
    """From the lane the permit names as its facilitator (the proxy refuses any other sender)."""
    facilitator = to_checksum_address("0x" + permit.facilitator.hex())
    return SettlementCall(UPTO_PROXY_ADDRESS, data, GAS_LIMIT, facilitator)


def _lane_nonce_spent(p: Payment, url: str, head_block: int) -> bool:
    """True when none of our transaction's unmined hashes can ever be mined: its lane's nonce was
    spent at confirmation depth (by a sibling signature of the same nonce, e.g. the replacement
    that reverted, or by a later transaction reusing it). A replaced signature never gets a
    receipt; without this, a payment whose replacement reverted would wait for it forever."""
    tx = p.settlement_tx
    if tx is None:
        return False  # a hash found on chain, not ours: its receipt may come back after a reorg
    depth = for_payment(p.network, p.asset).option.confirmations
    return relayers.nonces_used(url, tx, head_block, depth) > tx.nonce


class Upto:
    name = WIRE.name
    wire = WIRE
    usage_priced = True
    batches = False
    facilitator_api = False

    def offers(self, charge: Charge, price: Decimal) -> list[Requirement]:
        """The pay-per-second offers of a charge: one per option our own relayer settles (the
        upto proxy lets only the permit's ``facilitator``, one of our relayer lanes, settle it);
        none through a remote facilitator."""
        if charge.usage is None:
            return []
        own = [c for c in configured() if c.mode != SettlementMode.FACILITATOR]
        if not own:
            return []
        facilitators = tuple(a.address for a in relayers.lanes())
        return [
            Requirement(
                c.option,
                atomic_amount(charge.usage.maximum, c.option.decimals),
                hold_seconds=charge.usage_hold_seconds,
                scheme=self.name,
                facilitators=facilitators,
            )
            for c in own
        ]

    def chain_state(
        self, conf: ConfiguredOption, verified: VerifiedPayment, contract: tuple[bytes, bytes] | None
    ) -> PayerState:
        permit = verified.payload.permit
        assert permit is not None
        state = permit2_state(conf.rpc_url, conf.option.asset, permit, contract)
        if contract is not None and not state.contract_approves:
            raise PaymentRejected(
                PERMIT2_INVALID_SIGNATURE, "not from's signature, and from is no contract wallet approving it"
            )
        if state.nonce_used:
            raise PaymentRejected(PERMIT2_NONCE_USED, "this permit's nonce is already used in Permit2")
        if state.balance < permit.maximum:
            raise PaymentRejected(PERMIT2_INSUFFICIENT_BALANCE, "the payer's balance does not cover the maximum")
        if (state.allowance or 0) < permit.maximum:
            raise PaymentRejected(
                PERMIT2_ALLOWANCE_REQUIRED, "the payer has not approved Permit2 for the maximum on this token"
            )
        return state

    def settlement_call(self, p: Payment, *, held: bool = False) -> SettlementCall:
        """The proxy's settle for the charge (``held``: for the signed maximum), from the lane
        the permit names as its facilitator."""
        permit = permit_of(p)
        amount = permit.maximum if held else int(p.amount)
        return _call(permit, permit_calldata(permit, amount, bytes.fromhex(p.signature[2:])))

    def held_call(self, verified: VerifiedPayment) -> SettlementCall:
        permit = verified.payload.permit
        assert permit is not None
        return _call(permit, permit_calldata(permit, permit.maximum, verified.payload.signature))

    def last_usable_second(self, valid_before: int) -> int:
        return valid_before  # Permit2 requires block.timestamp <= deadline

    def transfer_matches(self, receipt: dict[str, Any], p: Payment) -> bool:
        """One permit per transaction of ours (upto is never batched), to our proxy: its Transfer
        of the charge. Permit2 logs no nonce use; the nonce's bit is read apart (chain_use)."""
        transfer = [TRANSFER_TOPIC, word(p.payer), word(p.pay_to)]
        to_proxy = (receipt.get("to") or "").lower() == UPTO_PROXY_ADDRESS.lower()
        return to_proxy and any(
            e[:3] == transfer and int(e[3], 16) == int(p.amount) for e in transfer_logs(receipt, p.asset)
        )

    def chain_use(self, p: Payment, conf: ConfiguredOption) -> AuthorizationUse:
        """The nonce's bit in Permit2's bitmap, and which of our transactions for it paid. The
        proxy lets only the permit's facilitator (our lane) settle it, so a used nonce that none
        of our transactions paid was spent by the payer elsewhere (another Permit2 transfer, or
        ``invalidateUnorderedNonces``): no money moved for this payment."""
        url = conf.rpc_url
        permit = permit_of(p)
        call = {
            "to": PERMIT2_ADDRESS,
            "data": "0x" + NONCE_BITMAP.hex() + word(p.payer)[2:] + permit.nonce_word.to_bytes(32, "big").hex(),
        }
        hashes = payment_hashes(p)
        try:
            head, bitmap, *receipts = rpc_batch(
                url,
                [
                    ("eth_getBlockByNumber", ["latest", False]),
                    ("eth_call", [call, "latest"]),
                    *[("eth_getTransactionReceipt", [h]) for h in hashes],
                ],
            )
            head_block, head_ts = int(head["number"], 16), int(head["timestamp"], 16)
            used = int(bitmap, 16) & permit.nonce_bit != 0
        except (RpcError, TypeError, KeyError, ValueError) as exc:
            raise ChainUnavailable(f"Permit2 nonce state unreadable: {exc}") from exc
        paid_in = next(
            (h for h, r in zip(hashes, receipts, strict=True) if r and succeeded(r) and self.transfer_matches(r, p)),
            None,
        )
        start = p.search_from_block or 0
        if used and paid_in is None and any(r is None for r in receipts) and not _lane_nonce_spent(p, url, head_block):
            # One of ours is not mined (yet, or any more): it may be the use. Ask again later.
            raise UseNotFound(f"payment {p.pk}: Permit2 nonce used, our transaction for it not mined")
        return AuthorizationUse(
            used, paid_in, None, head_block, head_ts, start, used_elsewhere=used and paid_in is None
        )


UPTO = Upto()
