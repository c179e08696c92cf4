from django.dispatch import Signal

#: Sent inside the transaction that moved a payment (kwargs: payment, previous).
payment_advanced = Signal()
