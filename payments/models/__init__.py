"""The payments app's models, one module per concern: the ledger (payments, their events and
transitions), the outbox (our signed transactions and the lanes' nonces), prices (hardware
tiers, the price history), refunds, finance's records, and the channels of the
``batch-settlement`` scheme (payments.channels.models). Import them from here."""

from payments.channels.models import Channel, ChannelCharge, ChannelStatus, ChannelTx, ChannelTxStatus
from payments.models.finance import (
    ChainTransfer,
    ExportDownload,
    ExportJob,
    ExportStatus,
    NativeTokenRate,
    ReconciliationNote,
    ScannedRange,
    TransferDirection,
)
from payments.models.ledger import (
    CHARGED_STATUSES,
    OPEN_STATUSES,
    PAID_STATUSES,
    TRANSITIONS,
    UNPAID_STATUSES,
    FailureCharge,
    IllegalTransition,
    Payment,
    PaymentEvent,
    PaymentIdentifier,
    PaymentQuerySet,
    PaymentStatus,
    UnpaidReason,
    UptoOrder,
    VerificationMethod,
    for_others_q,
    held_q,
)
from payments.models.outbox import RelayerNonce, SettlementTx, SettlementTxQuerySet
from payments.models.prices import HardwareTier, PriceChange
from payments.models.refunds import REFUND_TRANSITIONS, Refund, RefundEvent, RefundStatus

__all__ = [
    "CHARGED_STATUSES",
    "OPEN_STATUSES",
    "PAID_STATUSES",
    "REFUND_TRANSITIONS",
    "TRANSITIONS",
    "UNPAID_STATUSES",
    "ChainTransfer",
    "Channel",
    "ChannelCharge",
    "ChannelStatus",
    "ChannelTx",
    "ChannelTxStatus",
    "ExportDownload",
    "ExportJob",
    "ExportStatus",
    "FailureCharge",
    "HardwareTier",
    "IllegalTransition",
    "NativeTokenRate",
    "Payment",
    "PaymentEvent",
    "PaymentIdentifier",
    "PaymentQuerySet",
    "PaymentStatus",
    "PriceChange",
    "ReconciliationNote",
    "Refund",
    "RefundEvent",
    "RefundStatus",
    "RelayerNonce",
    "ScannedRange",
    "SettlementTx",
    "SettlementTxQuerySet",
    "TransferDirection",
    "UnpaidReason",
    "UptoOrder",
    "VerificationMethod",
    "for_others_q",
    "held_q",
]
