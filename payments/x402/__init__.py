"""The x402 protocol, free of Django: wire types, codecs, EIP-712, and one module per scheme
(``exact.py``, ``upto.py``: wire shape and verification) registered in ``mechanisms.py``.

Nothing in this package imports Django or touches the network, so it can be unit-tested alone
and reused by other services.
"""
