"""Certificate and key material the broker makes itself: a SPIFFE CA and JWT-SVID keys for dev setups.

Used by `broker serve --dev` and the test kit; may import `broker.domain` only.
"""
