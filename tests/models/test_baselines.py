"""The paper's baselines: shapes, padding invariance, no label in predict, gradients, learning,
CA's factor mean, the registry and config, and how prediction, reports and backtests treat a
model without sigma."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fvae_dist.config import all_keys, dump_config, load_config
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.backtest import BacktestConfig, strategy_scores
from fvae_dist.evaluate.report import build_report, load_run
from fvae_dist.models.baselines.ca import managed_portfolios
from fvae_dist.models.factorvae import FactorVAE, FactorVAEConfig
from fvae_dist.models.registry import MODEL_NAMES, ModelConfig, build_model, model_label
from tests.models.batches import assert_rejects_bad_batches, make_batch, train_on_random_days, widen_batch

BASELINES = [name for name in MODEL_NAMES if name != "factorvae"]


SMALL = ModelConfig(num_features=4, seq_len=5, hidden_size=12, num_factors=3, num_portfolios=6)


def small_model(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(SMALL, name=name, **overrides)).eval()
    if name == "ca":
        # a trained-looking factor mean, so that CA's predictions are not identically 0
        model.factor_mean.copy_(torch.randn(SMALL.num_factors))
    return model


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASELINES)
def test_shapes_mse_slots_and_nan_sigma(name):
    model = small_model(name)
    x, mask, y = make_batch([7, 4, 2])
    out = model(x, mask, y)
    for key in ("loss", "nll", "kl"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert out["kl"] == 0 and out["nll"] == out["loss"]

    mu, sigma = model.predict(x, mask)
    assert mu.shape == sigma.shape == (3, 7)
    assert (mu[~mask] == 0).all() and torch.isfinite(mu[mask]).all()
    assert not (mu[mask] == 0).all()
    assert torch.isnan(sigma).all()  # no risk estimate, padding included


@pytest.mark.parametrize("name", ["gru", "ca"])
def test_loss_is_the_per_day_mse_averaged_over_days(name):
    model = small_model(name)
    x, mask, y = make_batch([6, 2], seed=3)
    out = model(x, mask, y)
    if name == "gru":
        pred, _ = model.predict(x, mask)
    else:  # CA's training loss reconstructs y from the day's own factors
        pred = (model.exposures(x, mask) * model.factors(x, mask, y)[:, None]).sum(-1)
    per_day = [((pred[d, :n] - y[d, :n]) ** 2).mean() for d, n in enumerate([6, 2])]
    torch.testing.assert_close(out["loss"], torch.stack(per_day).mean())


@pytest.mark.parametrize("name", BASELINES)
def test_bad_batches_raise_data_error_naming_the_input(name):
    model = small_model(name)
    assert_rejects_bad_batches(model)


def test_linear_needs_the_configured_window_length():
    model = small_model("linear")
    x, mask, _ = make_batch([4], T=7)
    with pytest.raises(DataError, match="model.seq_len"):
        model.predict(x, mask)


# ---------------------------------------------------------------------------------------------
# padding invariance and no label in predict
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_a_day_gives_the_same_outputs_alone_or_batched_and_padded(name, garbage):
    model = small_model(name)
    sizes = [6, 9, 3]
    x, mask, y = make_batch(sizes, seed=7, garbage=garbage)  # padded to 9 with garbage
    x_wide, mask_wide, y_wide, slots = widen_batch(x, mask, y, garbage)

    batched = model(x_wide, mask_wide, y_wide)
    mu_b, sigma_b = model.predict(x_wide, mask_wide)
    assert torch.isfinite(batched["loss"]) and torch.isfinite(mu_b).all()
    assert (mu_b[~mask_wide] == 0).all()
    losses = []
    for d, n in enumerate(sizes):
        real_b = slots if d == 0 else torch.arange(n)
        alone_x, alone_mask, alone_y = x[d:d + 1, :n], mask[d:d + 1, :n], y[d:d + 1, :n]
        losses.append(model(alone_x, alone_mask, alone_y)["loss"])
        mu, _ = model.predict(alone_x, alone_mask)
        torch.testing.assert_close(mu_b[d, real_b], mu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched["loss"], torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_padding_garbage_gives_finite_gradients_that_reach_every_parameter(name):
    model = small_model(name).train()
    x, mask, y = make_batch([6, 2, 5], seed=4, garbage=float("nan"))
    model(x, mask, y)["loss"].backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient reaches {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {param_name}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient in {param_name}"


@pytest.mark.parametrize("name", BASELINES)
def test_predict_never_reads_the_label(name):
    model = small_model(name)
    assert list(inspect.signature(model.predict).parameters) == ["x", "mask"]
    x, mask, y = make_batch([8, 5], seed=9)
    before, _ = model.predict(x, mask)
    # an evaluation-mode loss with any labels leaves no trace in the model
    model(x, mask, torch.randn_like(y) * 5)
    after, _ = model.predict(x, mask)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# model-specific equations
# ---------------------------------------------------------------------------------------------

def test_ca_managed_portfolios_are_the_least_squares_coefficients_over_real_stocks():
    x, mask, y = make_batch([9, 6], seed=5)
    z = x[:, :, -1, :]
    x_p = managed_portfolios(z, y, mask, ridge=1e-12)
    for d, n in enumerate([9, 6]):
        expected = torch.linalg.lstsq(z[d, :n].double(), y[d, :n].double()).solution.float()
        torch.testing.assert_close(x_p[d], expected, rtol=1e-4, atol=1e-5)


def test_ca_factor_mean_is_learnt_in_train_mode_only_and_saved_with_the_weights():
    model = small_model("ca")
    model.factor_mean.zero_()
    x, mask, y = make_batch([8, 6, 7], seed=6)
    model(x, mask, y)  # eval mode: no update
    assert (model.factor_mean == 0).all() and int(model.factor_updates) == 0

    model.train()
    first = model.factors(x, mask, y).mean(dim=0).detach()
    model(x, mask, y)
    torch.testing.assert_close(model.factor_mean, first)  # the first update is the plain mean
    x2, mask2, y2 = make_batch([5, 9], seed=16)
    second = model.factors(x2, mask2, y2).mean(dim=0).detach()
    model(x2, mask2, y2)
    torch.testing.assert_close(model.factor_mean, (first + second) / 2)
    assert int(model.factor_updates) == 2

    state = model.state_dict()
    assert {"factor_mean", "factor_updates"} <= set(state)
    restored = small_model("ca", seed=1)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.factor_mean, model.factor_mean)
    model.eval()
    torch.testing.assert_close(restored.predict(x, mask)[0], model.predict(x, mask)[0], rtol=0, atol=0)
    # prediction is beta times the factor mean
    expected = (model.exposures(x, mask) * model.factor_mean).sum(-1)
    torch.testing.assert_close(model.predict(x, mask)[0], expected)


def test_ca_factor_mean_becomes_an_exponential_average_after_one_over_momentum_steps():
    model = small_model("ca", ca_lambda_momentum=0.5).train()
    model.factor_mean.zero_()
    means = []
    for seed in range(4):
        x, mask, y = make_batch([6, 5], seed=20 + seed)
        means.append(model.factors(x, mask, y).mean(dim=0).detach())
        model(x, mask, y)
    expected = means[0]
    for step, m in enumerate(means[1:], start=1):
        expected = expected + max(0.5, 1 / (step + 1)) * (m - expected)
    torch.testing.assert_close(model.factor_mean, expected)


def test_gat_attention_is_a_softmax_over_the_days_real_stocks_only():
    model = small_model("gat")
    x, mask, _ = make_batch([6, 3], n_pad=8, seed=11)
    e = torch.zeros(2, 8, SMALL.hidden_size)
    e[mask] = model.encoder(x[mask])
    alpha = model.attention_weights(e, mask)
    assert alpha.shape == (2, 8, 8)
    assert (alpha[:, :, ~mask[0]][0] == 0).all() and (alpha[1][:, ~mask[1]] == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 8))
    assert (alpha[mask][:, :3] > 0).all()


def test_sfm_with_a_single_frequency_component_still_depends_on_the_whole_window():
    model = small_model("sfm", freq_dim=1)
    x, mask, _ = make_batch([5], seed=12)
    changed = x.clone()
    changed[:, :, 0] += 1.0  # only the oldest step
    assert not torch.allclose(model.predict(x, mask)[0], model.predict(changed, mask)[0])


def test_transformer_positions_make_the_order_of_steps_matter():
    model = small_model("trans")
    x, mask, _ = make_batch([5], seed=13)
    swapped = x[:, :, [1, 0, 2, 3, 4]]
    assert not torch.allclose(model.predict(x, mask)[0], model.predict(swapped, mask)[0])


# ---------------------------------------------------------------------------------------------
# learning and numerics
# ---------------------------------------------------------------------------------------------

def learnable_market(days: int, gen: torch.Generator, N: int = 24, T: int = 5, C: int = 4):
    """y = the last step's characteristics times fixed weights, plus a little noise."""
    x = torch.randn(days, N, T, C, generator=gen)
    weights = torch.tensor([1.0, -0.8, 0.5, 0.0])
    y = x[:, :, -1] @ weights + 0.1 * torch.randn(days, N, generator=gen)
    return x, torch.ones(days, N, dtype=torch.bool), y


@pytest.mark.parametrize("name", BASELINES)
def test_a_few_dozen_adam_steps_learn_a_toy_market(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(12)
    model = build_model(dataclasses.replace(SMALL, name=name, hidden_size=16))
    x_train, mask_train, y_train = learnable_market(48, gen)
    x_test, mask_test, y_test = learnable_market(8, gen)

    def held_out_mse() -> float:
        model.eval()
        with torch.no_grad():
            mu, _ = model.predict(x_test, mask_test)
        return float(((mu - y_test) ** 2).mean())

    before = held_out_mse()
    train_on_random_days(model, x_train, mask_train, y_train, steps=60, lr=1e-2, gen=gen)
    after = held_out_mse()
    # the label's variance is ~1.9; a model that learnt the signal predicts most of it
    assert after < 0.5 * before and after < 0.8, (before, after)


@pytest.mark.parametrize("name", BASELINES)
def test_bf16_autocast_forward_backward(name):
    model = small_model(name).train()
    x, mask, y = make_batch([6, 4], seed=14)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x, mask, y)
        mu, _ = model.predict(x, mask)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert mu.dtype == torch.float32 and torch.isfinite(mu).all()
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# registry and config
# ---------------------------------------------------------------------------------------------

def test_registry_builds_factorvae_from_either_config():
    assert isinstance(build_model(SMALL), FactorVAE)
    assert isinstance(build_model(FactorVAEConfig(num_features=4, hidden_size=8)), FactorVAE)
    assert isinstance(build_model(dataclasses.replace(SMALL, name="gru")), torch.nn.Module)
    assert not isinstance(build_model(dataclasses.replace(SMALL, name="gru")), FactorVAE)


def test_model_name_through_overrides_case_insensitive_and_keys_listed():
    cfg = load_config(None, ["model.name=GRU", "model.num_layers=3", "model.dropout=0.1"])
    assert (cfg.model.name, cfg.model.num_layers, cfg.model.dropout) == ("gru", 3, 0.1)
    assert isinstance(cfg.model, FactorVAEConfig)
    keys = set(all_keys())
    assert {"model.name", "model.num_layers", "model.dropout", "model.num_heads", "model.freq_dim",
            "model.ca_ridge", "model.ca_lambda_momentum", "model.hidden_size"} <= keys


def test_unknown_model_name_gives_a_hint():
    with pytest.raises(ConfigError, match=r"model\.name.*did you mean 'gru'"):
        load_config(None, ["model.name=grru"])
    with pytest.raises(ConfigError, match=r"model\.name.*valid: .*sfm"):
        load_config(None, ["model.name=xgboost"])


@pytest.mark.parametrize("override, fragment", [
    ("model.num_layers=0", "model.num_layers"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.freq_dim=-2", "model.freq_dim"),
    ("model.ca_ridge=0", "model.ca_ridge"),
    ("model.ca_lambda_momentum=1.5", "model.ca_lambda_momentum"),
    ("model.hidden_size=0", "model.hidden_size"),
])
def test_bad_baseline_settings_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_transformer_heads_must_divide_the_hidden_size():
    with pytest.raises(ConfigError, match=r"model\.num_heads"):
        load_config(None, ["model.name=trans", "model.hidden_size=10", "model.num_heads=3"])
    # other models ignore num_heads
    assert load_config(None, ["model.name=gru", "model.hidden_size=10", "model.num_heads=3"]).model.num_heads == 3


def test_model_fields_are_documented():
    import ast

    import fvae_dist.models.registry as registry

    tree = ast.parse(inspect.getsource(registry))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ModelConfig")
    documented = {first.target.id for first, second in zip(cls.body, cls.body[1:])
                  if isinstance(first, ast.AnnAssign) and isinstance(second, ast.Expr)}
    own = {f.name for f in dataclasses.fields(ModelConfig)} - {f.name for f in dataclasses.fields(FactorVAEConfig)}
    assert own <= documented


def test_gru_preset_matches_the_csi300_preset_but_for_the_model():
    from tests.test_config import PRESETS

    base = yaml.safe_load((PRESETS / "csi300.yaml").read_text())
    gru = yaml.safe_load((PRESETS / "csi300_gru.yaml").read_text())
    assert gru["data"] == base["data"] and gru["train"] == base["train"]
    assert load_config(PRESETS / "csi300_gru.yaml").model.name == "gru"
    assert gru["ray"]["run_name"] != base["ray"]["run_name"]


def test_model_labels_follow_the_paper():
    assert [model_label(n) for n in BASELINES] == ["Linear", "CA", "GRU", "ALSTM", "GAT", "Trans", "SFM"]
    assert model_label("factorvae", "prior") == "FactorVAE-prior"
    assert model_label("factorvae") == "FactorVAE" and model_label("LightGBM") == "LightGBM"


# ---------------------------------------------------------------------------------------------
# prediction files, reports and backtests of a model without sigma
# ---------------------------------------------------------------------------------------------

def test_exposures_are_refused_for_a_baseline_run(tmp_path):
    from fvae_dist.train.predict import predict_split

    run = tmp_path / "gru-run"
    dump_config(load_config(None, ["model.name=gru", f"data.dataset_dir={tmp_path / 'nowhere'}"]), run / "config.yaml")
    with pytest.raises(ConfigError, match="exist only for FactorVAE"):
        predict_split(run, "test", exposures=True)


def _prediction_frame(seed: int, sigma: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=30)
    frame = pd.DataFrame([(d, f"SH{600000 + i}") for d in dates for i in range(40)], columns=["date", "instrument"])
    frame["label"] = rng.normal(0, 0.02, len(frame))
    scale = np.exp(rng.normal(-4.0, 0.5, len(frame)))
    frame["mu"] = frame["label"] * 0.3 + rng.normal(0, 1, len(frame)) * scale
    frame["sigma"] = scale if sigma else np.nan
    return frame


def _write_run(path, model: dict, predictions: pd.DataFrame) -> None:
    (path / "predictions").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "train": {"seed": 0}}))
    predictions.to_parquet(path / "predictions" / "test.parquet")


def test_report_names_runs_by_model_and_skips_sigma_parts_of_baselines(tmp_path):
    _write_run(tmp_path / "runs" / "fvae", {"name": "factorvae", "variant": "port"}, _prediction_frame(0, True))
    _write_run(tmp_path / "runs" / "gru", {"name": "gru", "variant": "factorvae"}, _prediction_frame(1, False))
    assert load_run(tmp_path / "runs" / "gru").model == "GRU"
    report = build_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "| FactorVAE-port |" in report and "| GRU |" in report
    assert (tmp_path / "out" / "calibration.png").is_file()
    note = next(line for line in report.splitlines() if line.startswith("_Calibration skipped"))
    assert "GRU" in note and "FactorVAE" not in note


def test_tdrisk_refuses_predictions_without_sigma_naming_the_file():
    predictions = _prediction_frame(2, False)
    with pytest.raises(ConfigError, match=r"runs/gru/predictions/test\.parquet: sigma is NaN"):
        strategy_scores(predictions, BacktestConfig(strategy="tdrisk"), source="runs/gru/predictions/test.parquet")
    assert len(strategy_scores(predictions, BacktestConfig(strategy="topk_drop"))) == len(predictions)


def test_backtest_command_refuses_tdrisk_before_reading_bars(tmp_path, capsys):
    from fvae_dist.cli import main as cli_main

    path = tmp_path / "gru-test.parquet"
    _prediction_frame(3, False).to_parquet(path)
    code = cli_main(["backtest", "--predictions", str(path), "--bars", str(tmp_path / "no-bars.parquet"),
                     "--benchmark", str(tmp_path / "no-index.parquet"), "--strategy", "both"])
    assert code == 2
    assert f"{path}: sigma is NaN in every row" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_on_the_158_features_with_the_data_sets_count(name):
    from fvae_dist.config import with_data_features
    from fvae_dist.data.features import ALPHA158

    # model.num_features is left at its default (0): the data set's manifest gives C
    cfg = load_config(None, [f"model.name={name}", "model.seq_len=5", "model.hidden_size=8", "model.num_factors=2",
                             "model.num_portfolios=4"])
    assert cfg.model.num_features == 0
    with pytest.raises(ConfigError, match="model.num_features=0"):
        build_model(cfg.model)
    cfg = with_data_features(cfg, {"features": list(ALPHA158), "feature_set": "alpha158"}, "ds/manifest.json")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    x, mask, y = make_batch([9, 5], C=158)
    model(x, mask, y)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(DataError, match="C=158"):
        model(x[..., :20], mask, y)
