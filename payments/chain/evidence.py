"""What the chain says about one payment: whether a receipt carries its transfer, whether its
authorization was used (and by what), and whether it can still be used. Each asks the
payment's scheme (``payments.schemes``)."""

from __future__ import annotations

import time
from typing import Any

from payments.chain.calls import succeeded
from payments.chain.node import AuthorizationUse
from payments.models import Payment
from payments.options import for_payment
from payments.schemes import scheme_of

#: A payment is taken as lapsed this long after validBefore by our clock, even if no block has
#: been stamped past it yet (a quiet dev chain mines no blocks; real chains stamp wall time).
LAPSE_MARGIN_SECONDS = 60


def transfer_matches(receipt: dict[str, Any], p: Payment) -> bool:
    """True when the receipt succeeded and carries this payment's own transfer (as its scheme
    tells it: for ``exact``, its authorization's use followed by its Transfer)."""
    return succeeded(receipt) and scheme_of(p.scheme).transfer_matches(receipt, p)


def chain_use(p: Payment) -> AuthorizationUse:
    """The chain's word on this payment's authorization: used (by which transaction) or not."""
    return scheme_of(p.scheme).chain_use(p, for_payment(p.network, p.asset))


def has_lapsed(p: Payment, use: AuthorizationUse | None = None) -> bool:
    """No block can use the authorization any more (the token requires timestamp < validBefore;
    Permit2, for an upto permit, timestamp <= deadline)."""
    last_usable = scheme_of(p.scheme).last_usable_second(p.valid_before)
    head_past = use is not None and use.head_timestamp > last_usable
    return head_past or time.time() >= p.valid_before + LAPSE_MARGIN_SECONDS
