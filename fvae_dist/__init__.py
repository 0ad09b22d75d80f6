"""fvae-dist: distributed FactorVAE training on Ray."""
__version__ = "0.1.0"
