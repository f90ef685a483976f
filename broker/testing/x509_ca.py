"""The test kit's X.509 CA: `broker.pki.x509_ca`, re-exported under its stable testing path."""

from broker.pki.x509_ca import FLAWS, SpiffeCA, X509Svid

__all__ = ["FLAWS", "SpiffeCA", "X509Svid"]
