"""Which model a run trains: `model.name` picks FactorVAE or one of the paper's baselines.

    ModelConfig          the config section "model": FactorVAEConfig plus `name` and the few
                         baseline hyper-parameters
    build_model(cfg)     the nn.Module for a config (training, prediction, tests)
    model_label(...)     the name a report prints ("FactorVAE-prior", "GRU", "Trans", ...)

Every model shares one interface, so the training loop, validation, prediction and reports
treat them alike:
    forward(x, mask, y) -> {"loss", "nll", "kl", ...}   (scalars; the loop logs all three)
    predict(x, mask)    -> (mu, sigma), each (D, N)
FactorVAE ignores the baseline keys (num_layers, dropout, num_heads, freq_dim, ca_ridge,
ca_lambda_momentum); the baselines ignore num_portfolios, gamma, variant, leaky_slope,
sigma_floor and port_ridge, and all but CA ignore num_factors (CA's K). An ignored key is still
part of the run's config.yaml, so changing one refuses a resume like any model change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fvae_dist.errors import ConfigError, nearest_name_hint
from fvae_dist.models.factorvae import FactorVAE, FactorVAEConfig

MODEL_NAMES = ("factorvae", "linear", "ca", "gru", "alstm", "gat", "trans", "sfm")

# How the paper's tables name each model; FactorVAE is named by its variant (Experiments 1-2).
MODEL_LABELS = {"linear": "Linear", "ca": "CA", "gru": "GRU", "alstm": "ALSTM", "gat": "GAT",
                "trans": "Trans", "sfm": "SFM"}
FACTORVAE_LABELS = {"factorvae": "FactorVAE", "prior": "FactorVAE-prior", "port": "FactorVAE-port"}


@dataclass(frozen=True)
class ModelConfig(FactorVAEConfig):
    """The "model" section: FactorVAE's hyper-parameters plus the choice of model and the few
    settings only the baselines read. Baseline defaults follow Qlib's benchmark configs for
    these models on Alpha158-20 (examples/benchmarks/<MODEL>/workflow_config_*_Alpha158.yaml:
    hidden_size 64, num_layers 2, dropout 0.0) where Qlib has the model."""

    num_features: int = 0
    """C: characteristics per stock and time step. 0 (the default): as many as the data set has, taken
    from its manifest when a run starts (train/trainer.py; the run's config.yaml records the number);
    a positive number must agree with the data set."""

    name: str = "factorvae"
    """Which model: "factorvae" (the paper's model; its variant picks FactorVAE / -prior /
    -port), or a baseline of the paper's Table 1: "linear", "ca", "gru", "alstm", "gat",
    "trans", "sfm". Case-insensitive."""

    num_layers: int = 2
    """Baselines: stacked recurrent layers (GRU, ALSTM, GAT's GRU encoder), Transformer encoder
    layers (trans), or hidden layers of CA's beta network. Qlib: 2. Unused by linear and sfm
    (one SFM layer, as in Zhang et al. 2017 and Qlib)."""

    dropout: float = 0.0
    """Baselines: dropout between stacked recurrent layers (GRU, ALSTM, GAT), inside the
    Transformer encoder layers (trans), after each hidden layer of CA's beta network, and on
    SFM's inputs and recurrent state. Qlib's Alpha158 configs: 0.0 (GATs: 0.7)."""

    num_heads: int = 2
    """trans only: attention heads; hidden_size must be a multiple of it. Qlib: nhead 2."""

    freq_dim: int = 10
    """sfm only: frequency components of the state-frequency memory (Zhang et al. 2017's K).
    Qlib's SFM class default: 10 (its Alpha360 config: 25)."""

    ca_ridge: float = 1e-4
    """ca only: ridge added to Z^T Z before solving for the managed portfolios
    (Z^T Z + ridge)^-1 Z^T y, relative to its mean diagonal (scale-free, like port_ridge)."""

    ca_lambda_momentum: float = 0.01
    """ca only: weight of each training step's mean factor in lambda, the factor mean that
    prediction uses. Until 1/momentum steps have been seen lambda is their plain average; after
    that an exponential moving average, so it follows the beta network as it trains (the days
    are shuffled every epoch, so recent steps are a random sample of the training days)."""

    def __post_init__(self) -> None:
        # 0 is "from the data set" here; FactorVAEConfig, which a model is built from, wants a count
        from_data = self.num_features == 0 and not isinstance(self.num_features, bool)
        if from_data:
            object.__setattr__(self, "num_features", 1)
        try:
            super().__post_init__()
        except ConfigError as exc:
            # FactorVAEConfig names its own class; here the settings are the "model" section's
            raise ConfigError(str(exc).replace("FactorVAEConfig.", "model.", 1)) from None
        finally:
            if from_data:
                object.__setattr__(self, "num_features", 0)
        name = self.name.strip().lower() if isinstance(self.name, str) else self.name
        if name not in MODEL_NAMES:
            raise ConfigError(f"model.name: unknown model {self.name!r}{nearest_name_hint(str(name), MODEL_NAMES)}")
        object.__setattr__(self, "name", name)
        for key in ("num_layers", "num_heads", "freq_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}: expected a positive integer, got {value!r}")
        _require_number(self.dropout, "model.dropout", "a number in [0, 1)", lambda v: 0 <= v < 1)
        _require_number(self.ca_ridge, "model.ca_ridge", "a number > 0", lambda v: v > 0)
        _require_number(self.ca_lambda_momentum, "model.ca_lambda_momentum", "a number in (0, 1]",
                        lambda v: 0 < v <= 1)
        if self.name == "trans" and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.num_heads: the Transformer splits hidden_size={self.hidden_size} over its "
                              f"heads, so it must divide it; got {self.num_heads}")


def _require_number(value, key: str, expected: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def model_name(cfg: FactorVAEConfig) -> str:
    """The registry name of a config; a plain FactorVAEConfig is FactorVAE."""
    return getattr(cfg, "name", "factorvae")


def is_factorvae(cfg: FactorVAEConfig) -> bool:
    return model_name(cfg) == "factorvae"


def model_label(name: str, variant: str | None = None) -> str:
    """"FactorVAE" / "FactorVAE-prior" / "FactorVAE-port" by variant, else "GRU", "Trans", ...;
    a name the registry does not know is returned as it is."""
    key = str(name).strip().lower()
    if key == "factorvae":
        return FACTORVAE_LABELS.get(variant or "factorvae", f"FactorVAE-{variant}")
    return MODEL_LABELS.get(key, str(name))


def build_model(cfg: FactorVAEConfig) -> nn.Module:
    """The model a config names. FactorVAE receives the config itself (a ModelConfig is a
    FactorVAEConfig); each baseline reads the fields it documents."""
    if cfg.num_features == 0:
        raise ConfigError("model.num_features=0 means \"as many as the data set has\"; a model needs the number: "
                          "build it from a run's config.yaml (where training recorded it) or config.with_data_features")
    name = model_name(cfg)
    if name == "factorvae":
        return FactorVAE(cfg)
    from fvae_dist.models import baselines

    return baselines.BUILDERS[name](cfg)
