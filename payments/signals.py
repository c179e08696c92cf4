from django.dispatch import Signal

#: Sent inside the transaction that moved a payment (kwargs: payment, previous).
payment_advanced = Signal()

#: Sent instead, once, inside the transaction that moved many payments to one status at once
#: (a batch's payments; kwargs: payments, previous: lists in the same order), so that receivers
#: can read what they need for all of them in one query.
payments_advanced = Signal()

#: Sent inside the transaction in which the chain, asked about a LAPSING payment, said its
#: authorization is unused and may still be used until it lapses (kwargs: payment): we will not,
#: or could not, settle it; only someone else still could (then it is paid, and followed).
payment_unsettled = Signal()
