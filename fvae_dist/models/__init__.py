"""Models: FactorVAE (the paper, equation by equation)."""
from fvae_dist.models.factorvae import VARIANTS, FactorVAE, FactorVAEConfig, build_model

__all__ = ["VARIANTS", "FactorVAE", "FactorVAEConfig", "build_model"]
