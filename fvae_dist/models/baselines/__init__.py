"""The paper's baselines (Table 1), each trained through FactorVAE's training path.

    linear  Linear   one linear layer on the flattened window
    ca      CA       Gu-Kelly-Xiu conditional autoencoder (exposures from characteristics)
    gru     GRU      stacked GRU + linear head
    alstm   ALSTM    attentive LSTM
    gat     GAT      GRU encoder + graph attention over the day's stocks
    trans   Trans    Transformer encoder over the window
    sfm     SFM      state-frequency memory RNN
Shared conventions (loss, "nll"/"kl" slots, NaN sigma, padding): baselines/common.py.
"""
from fvae_dist.models.baselines.alstm import ALSTMBaseline
from fvae_dist.models.baselines.ca import CABaseline
from fvae_dist.models.baselines.gat import GATBaseline
from fvae_dist.models.baselines.gru import GRUBaseline
from fvae_dist.models.baselines.linear import LinearBaseline
from fvae_dist.models.baselines.sfm import SFMBaseline
from fvae_dist.models.baselines.transformer import TransformerBaseline

BUILDERS = {
    "linear": LinearBaseline,
    "ca": CABaseline,
    "gru": GRUBaseline,
    "alstm": ALSTMBaseline,
    "gat": GATBaseline,
    "trans": TransformerBaseline,
    "sfm": SFMBaseline,
}

__all__ = ["BUILDERS", "ALSTMBaseline", "CABaseline", "GATBaseline", "GRUBaseline", "LinearBaseline",
           "SFMBaseline", "TransformerBaseline"]
