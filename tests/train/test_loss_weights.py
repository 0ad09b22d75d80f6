"""train.index_share: each day's loss leans towards an index's members (train/loss_weights.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.models.baselines.common import masked_mse
from fvae_dist.models.factorvae import FactorVAEConfig, build_model, gaussian_nll
from fvae_dist.train.loss_weights import IndexMemberWeights
from fvae_dist.train.trainer import train
from tests.toy_dataset import tiny_overrides

MEMBERSHIP = pd.DataFrame({
    "instrument": ["A", "B", "C", "B"],
    "start_date": pd.to_datetime(["2020-01-01", "2020-01-01", "2020-03-01", "2020-06-01"]),
    "end_date": pd.to_datetime(["2020-12-31", "2020-02-28", "2020-12-31", "2020-12-31"]),
})


def test_members_carry_the_share_and_the_weights_average_one():
    weights = IndexMemberWeights(MEMBERSHIP, share=0.5)
    stocks = np.array(["A", "B", "C", "D", "E", "F"])
    # 2020-02-03: A and B are members (B's first interval), C not yet
    w = weights.day_weights(stocks, np.datetime64("2020-02-03"))
    assert w.mean() == pytest.approx(1.0)
    assert w[:2].sum() / w.sum() == pytest.approx(0.5)
    assert w[0] == w[1] and w[2] == w[3] == w[4] == w[5] and w[0] > w[2]
    # 2020-04-01: B left (between its intervals), C joined
    w = weights.day_weights(stocks, np.datetime64("2020-04-01"))
    assert (w[[0, 2]].sum() / w.sum()) == pytest.approx(0.5) and w[1] == w[3]


def test_a_share_equal_to_the_members_count_share_or_a_day_without_members_weighs_all_alike():
    stocks = np.array(["A", "B", "C", "D"])
    np.testing.assert_allclose(IndexMemberWeights(MEMBERSHIP, 0.5).day_weights(stocks, "2020-02-03"), 1.0)
    assert (IndexMemberWeights(MEMBERSHIP, 0.9).day_weights(stocks, "2021-06-01") == 1.0).all()  # after every interval
    assert (IndexMemberWeights(MEMBERSHIP, 0.9).day_weights(np.array(["A"]), "2020-02-03") == 1.0).all()


def test_a_padded_batch_gets_zero_weight_at_its_padding():
    batch = {"mask": np.array([[True, True, True], [True, True, False]]),
             "instruments": [np.array(["A", "D", "E"]), np.array(["A", "E"])],
             "date": np.array(["2020-02-03", "2020-02-04"], dtype="datetime64[D]")}
    w = IndexMemberWeights(MEMBERSHIP, 0.8)(batch)
    assert w.shape == (2, 3) and w[1, 2] == 0
    np.testing.assert_allclose(w[0], [3 * 0.8, 3 * 0.2 / 2, 3 * 0.2 / 2], rtol=1e-6)
    np.testing.assert_allclose(w[1, :2], [2 * 0.8, 2 * 0.2], rtol=1e-6)


def test_weighted_nll_is_the_weighted_mean_and_ignores_zero_weight_stocks():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True, False]])
    y, mu = torch.randn(1, 4), torch.randn(1, 4, requires_grad=True)
    sigma = torch.rand(1, 4) + 0.5
    weight = torch.tensor([[2.0, 1.0, 0.0, 5.0]])  # the padded slot's weight must not count
    nll = gaussian_nll(y, mu, sigma, mask, weight)
    per_stock = 0.5 * np.log(2 * np.pi) + sigma.log() + 0.5 * ((y - mu) / sigma) ** 2
    expected = (2 * per_stock[0, 0] + per_stock[0, 1]) / 3
    assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
    nll.sum().backward()
    assert mu.grad[0, 2] == 0 and mu.grad[0, 3] == 0 and mu.grad[0, 0] != 0
    # weight None is eq. 17's plain mean, and weight 1 everywhere gives the same number
    ones = torch.ones(1, 4)
    assert gaussian_nll(y, mu, sigma, mask, ones).item() == pytest.approx(gaussian_nll(y, mu, sigma, mask).item(), rel=1e-7)
    assert masked_mse(mu, y, mask, ones).item() == pytest.approx(masked_mse(mu, y, mask).item(), rel=1e-7)


def test_factorvae_loss_with_unit_weights_equals_the_papers():
    model = build_model(FactorVAEConfig(num_features=3, seq_len=4, hidden_size=8, num_factors=2, num_portfolios=4)).eval()
    x, y = torch.randn(2, 5, 4, 3), torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    plain = model(x, mask, y)["loss"]
    assert model(x, mask, y, torch.ones(2, 5))["loss"].item() == pytest.approx(plain.item(), rel=1e-6)
    leaning = torch.ones(2, 5)
    leaning[:, 0] = 4.0
    assert model(x, mask, y, leaning)["loss"].item() != pytest.approx(plain.item(), rel=1e-4)


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.index_membership"):
        load_config(None, ["train.index_share=0.5"])
    with pytest.raises(ConfigError, match=r"train.index_share: expected a number in \[0, 1\]"):
        load_config(None, ["train.index_share=1.5", "train.index_membership=m.csv"])


def test_a_missing_membership_file_fails_before_the_run_folder_is_made(toy_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(toy_dir, tmp_path, "weighted", "train.index_share=0.5",
                                           f"train.index_membership={tmp_path / 'nope.csv'}"))
    with pytest.raises(DataError, match="nope.csv: no such file"):
        train(cfg)
    assert not (tmp_path / "weighted").exists()


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_weighted_run_trains_another_function_than_the_plain_one(ray_local, toy_dir, tmp_path):
    """One worker, one epoch, the same seed: the plain run and one with index_share differ only
    in the weights, so equal losses would mean the weights never reached the step."""
    members = tmp_path / "members.csv"
    pd.DataFrame({"instrument": [f"SH{600000 + i}" for i in range(4)], "start_date": "2000-01-01",
                  "end_date": "2030-12-31"}).to_csv(members, index=False)
    losses = {}
    for name, extra in {"plain": [], "weighted": ["train.index_share=0.9", f"train.index_membership={members}"]}.items():
        cfg = load_config(None, tiny_overrides(toy_dir, tmp_path, name, "train.epochs=1", "ray.num_workers=1",
                                               "train.early_stopping_patience=0", *extra))
        outcome = train(cfg)
        assert load_config(outcome.run_dir / "config.yaml").train.index_share == (0.9 if extra else 0.0)
        losses[name] = outcome.metrics["history"][0]["train_loss"]
    assert np.isfinite(list(losses.values())).all()
    assert losses["weighted"] != pytest.approx(losses["plain"], rel=1e-4)
