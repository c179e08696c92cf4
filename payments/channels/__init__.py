"""Payment channels of the x402 ``batch-settlement`` scheme, our side: the mirror of each
channel (``models``), the per-request charge against it (``charges``), its state read from the
settlement contract (``state``), and the transactions our relayer sends for channels through the
outbox: deposits, claims, settles and cooperative refunds (``outbox``), with the sweep deciding
when to claim (``sweep``). The protocol itself (wire types, EIP-712, the pure checks) is
``payments.x402.batch_settlement``.
"""
