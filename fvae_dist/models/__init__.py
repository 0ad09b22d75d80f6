"""Models: FactorVAE (the paper, equation by equation) and the paper's baselines.

`registry.build_model(cfg)` builds whichever model `cfg.name` names; `factorvae.build_model`
builds FactorVAE only."""
from fvae_dist.models.factorvae import VARIANTS, FactorVAE, FactorVAEConfig, build_model
from fvae_dist.models.registry import MODEL_NAMES, ModelConfig, model_label

__all__ = ["MODEL_NAMES", "VARIANTS", "FactorVAE", "FactorVAEConfig", "ModelConfig", "build_model", "model_label"]
