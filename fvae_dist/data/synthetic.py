"""A synthetic stock market: a dynamic factor model whose expected returns show in past bars.

Everything is seeded and generated lazily by instrument chunks: stock i's path depends only on
(seed, i) and on the common factor paths (seed), so any chunking yields the same bars, and
4,000 stocks x 3,000 days fit in memory one chunk at a time.

The model (day t, stock i; every AR(1) starts from its stationary law and runs B = 60 burn-in days
before the first emitted day so the reversal/volume states are warmed up too):

Characteristics (persistent, three of them), l = 1..3:
    c_{i,l,t} = cbar_{i,l} + x_{i,l,t},   cbar ~ N(0, 0.8^2),  x AR(1): phi_c = 0.995, sd 0.6
    c1 = illiquidity, c2 = riskiness, c3 = style.

Observable consequences of the characteristics (what features can pick up):
    idiosyncratic volatility  sigma_{i,t} = sigma0 * exp(0.45 c2 + h_{i,t} - const),
                              h AR(1): phi_h = 0.95, sd 0.3                   (STD5, RESI*, clustering)
    volume surprise           v_{i,t} AR(1): phi_v = 0.7, sd omega_{i,t} = 0.3 exp(0.5 c1)   (VSTD*)
    log volume                log V_{i,t} = 13.5 - 0.8 c1 + v_{i,t} + 0.3 |eps_{i,t}|   (CORR*, VMA*)

Common factors k = 1..K (factor 1 is "the market"):
    premia     m_{k,t} = mu_k + phi_m (m_{k,t-1} - mu_k) + noise,  phi_m = 0.99 (persistent), sd 0.15%
    returns    f_{k,t} = m_{k,t-2} + s_{k,t} z_{k,t},  z ~ N(0, 1),
               s_{1,t} = 0.011 exp(g_t) with g AR(1) (volatility clustering), s_{k>1} = 0.006
    exposures  beta_{i,1,t} = 1 + 0.3 tanh(c2) + b_i,   beta_{i,k,t} = 0.8 tanh(w_k . c_{i,t})  (k > 1)
               w_k: fixed random unit vectors (seeded).

Idiosyncratic shocks (heavy tailed):
    u_{i,t} = sigma_{i,t-1} eps_{i,t},  eps = Student-t(nu = 5) scaled to unit variance
    reversal state U_{i,t} = delta U_{i,t-1} + u_{i,t},  delta = 0.6

Expected return of day t+2 set at the close of day t (the label y_t = close[t+2]/close[t+1] - 1):
    E_{i,t} = a_{i,t} + sum_k beta_{i,k,t} m_{k,t} - theta (1 - 0.5 tanh(v_{i,t} / omega_{i,t})) U_{i,t}
    a_{i,t} = alpha (tanh(c1) - tanh(c2)), alpha = 0.1%   (illiquidity premium, low-risk anomaly)
    theta = 0.05; reversal weakens after high-volume days (a nonlinear volume-return interaction).

Simple daily return, clipped to +-30%:
    R_{i,t+2} = E_{i,t} + sum_k beta_{i,k,t} s_{k,t+2} z_{k,t+2} + u_{i,t+2}
so E_{i,t} is exactly E[y_t | information at t] (up to the rarely binding clip): the oracle.
Momentum (ROC60 ~ beta . past factor returns ~ beta . m), short-term reversal (past 5-day return
~ U), risk (STD ~ sigma ~ c2) and volume features (VSTD ~ omega ~ c1, volume ratio ~ v) all carry
part of it. With the defaults (300 stocks x 1,000 days, seed 0): daily return sd 2.2%, excess
kurtosis about 8, oracle Rank IC of E against the realised label 0.10; single features' mean daily
Rank IC (Qlib's ROCd = close[t-d]/close[t]): ROC5 +0.030 (reversal), ROC60 -0.024 (momentum),
STD60 -0.015, VSTD20 +0.011.

Bars: close_t = P0 prod(1 + R); open = close_{t-1} exp(gap), high/low = max/min(open, close) times
exp(+-|noise| sigma): low <= open, close <= high, all > 0. factor = 1.0. Stocks list (25% after
day 0) and delist (hazard 4%/year); a few single days are suspended (no row). The membership frame
holds each stock's listing interval.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from fvae_dist.data.bars import bars_frame, calendar_window, chunked, to_day
from fvae_dist.errors import ConfigError

GENERATOR_VERSION = 1  # bump when the model changes, so fingerprints (and cached data sets) change
N_CHARACTERISTICS = 3
BURN_IN_DAYS = 60


@dataclass(frozen=True)
class SyntheticParams:
    """Model constants (see the module docstring for where each one enters)."""

    idio_vol: float = 0.016  # sigma0: typical idiosyncratic daily volatility
    t_dof: float = 5.0  # nu: Student-t degrees of freedom of the idiosyncratic shocks
    char_persistence: float = 0.995  # phi_c
    vol_persistence: float = 0.95  # phi_h
    vol_of_vol: float = 0.3  # stationary sd of h
    risk_vol_loading: float = 0.45  # how strongly riskiness c2 raises idiosyncratic volatility
    illiquidity_volume_loading: float = 0.5  # how strongly illiquidity c1 raises volume volatility omega
    volume_persistence: float = 0.7  # phi_v
    volume_surprise_sd: float = 0.3  # omega at c1 = 0
    premium_persistence: float = 0.99  # phi_m
    market_premium_mean: float = 0.0003  # mu_1 (other factors: 0)
    premium_sd: float = 0.0015  # stationary sd of m_k
    market_vol: float = 0.011  # s_1 at g = 0
    factor_vol: float = 0.006  # s_k, k > 1
    reversal_decay: float = 0.6  # delta
    reversal_strength: float = 0.05  # theta
    characteristic_alpha: float = 0.001  # alpha
    return_clip: float = 0.3
    listed_at_start: float = 0.75
    delist_hazard_per_year: float = 0.04
    suspension_rate: float = 0.002


def generate_market(
    n_stocks: int, n_days: int, seed: int = 0, n_factors: int = 3, start="2015-01-05",
    params: SyntheticParams | None = None,
) -> SyntheticMarket:
    """A lazily generated synthetic market (a BarSource); nothing is simulated until chunks are read."""
    return SyntheticMarket(n_stocks, n_days, seed=seed, n_factors=n_factors, start=start, params=params)


class SyntheticMarket:
    """BarSource over the model above; bars of stock i depend only on (seed, i) and the common paths."""

    def __init__(self, n_stocks: int, n_days: int, seed: int = 0, n_factors: int = 3, start="2015-01-05",
                 params: SyntheticParams | None = None):
        for setting, value, least in (("stocks", n_stocks, 1), ("days", n_days, 3), ("k", n_factors, 1)):
            if int(value) != value or value < least:
                raise ConfigError(f"synthetic {setting}={value}: expected an integer >= {least}")
        if int(seed) != seed or seed < 0:
            raise ConfigError(f"synthetic seed={seed}: expected an integer >= 0")
        self.n_stocks, self.n_days, self.seed, self.n_factors = int(n_stocks), int(n_days), int(seed), int(n_factors)
        self.params = params or SyntheticParams()
        self.calendar = pd.bdate_range(to_day(start, "synthetic start"), periods=self.n_days).to_numpy().astype("datetime64[D]")
        self.name = (
            f"synthetic(stocks={self.n_stocks},days={self.n_days},seed={self.seed},"
            f"k={self.n_factors},start={self.calendar[0]})"
        )
        width = max(5, len(str(self.n_stocks - 1)))
        self.instruments = [f"SYN{i:0{width}d}" for i in range(self.n_stocks)]
        self._index = {code: i for i, code in enumerate(self.instruments)}
        self._common = _simulate_common(self.seed, self.n_factors, self.n_days + BURN_IN_DAYS, self.params)
        self._listing, self._delisting = _listing_days(self.seed, self.n_stocks, self.n_days, self.params)
        self.membership = pd.DataFrame(
            {
                "instrument": self.instruments,
                "start_date": self.calendar[self._listing].astype("datetime64[ns]"),
                "end_date": self.calendar[self._delisting - 1].astype("datetime64[ns]"),
            }
        )
        self._cache: tuple[tuple[int, ...], dict] | None = None

    # -- BarSource ---------------------------------------------------------------------------------
    def iter_chunks(self, instruments_per_chunk: int = 256, start=None, end=None) -> Iterator[pd.DataFrame]:
        lo, hi = calendar_window(self.calendar, start, end, self.name)
        for codes in chunked(self.instruments, instruments_per_chunk):
            sim = self._simulate([self._index[c] for c in codes])
            frame = _long_rows(sim, self.calendar, lo, hi, ("open", "high", "low", "close", "volume"))
            if len(frame):
                yield bars_frame(frame.pop("date"), frame.pop("instrument"), frame)

    def fingerprint(self) -> str:
        text = f"{self.name}|v{GENERATOR_VERSION}|{sorted(asdict(self.params).items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def open_args(self) -> dict | None:
        if self.params != SyntheticParams():  # a spec string cannot carry custom generator parameters
            return None
        spec = (f"synthetic:stocks={self.n_stocks},days={self.n_days},seed={self.seed},"
                f"k={self.n_factors},start={self.calendar[0]}")
        return {"spec": spec, "market": "all", "membership": None}

    # -- extras ------------------------------------------------------------------------------------
    def true_expected_returns(self, chunk_or_instruments) -> pd.DataFrame:
        """The generator's E[y_t | information at t], y_t = close[t+2]/close[t+1] - 1.

        Given a bars frame: one row per (date, instrument) row of it, in its order. Given instrument
        codes: every day each of them has a bar. Columns date, instrument, expected_return.
        """
        if isinstance(chunk_or_instruments, pd.DataFrame):
            rows = chunk_or_instruments[["date", "instrument"]]
            codes = list(pd.unique(rows["instrument"]))
        else:
            rows, codes = None, list(chunk_or_instruments)
        unknown = [c for c in codes if c not in self._index]
        if unknown:
            raise ConfigError(f"{self.name}: unknown instruments {unknown[:5]}; expected codes like {self.instruments[0]}")
        sim = self._simulate([self._index[c] for c in codes])
        oracle = _long_rows(sim, self.calendar, self.calendar[0], self.calendar[-1], ("expected_return",))
        oracle["date"] = oracle["date"].astype("datetime64[ns]")
        if rows is None:
            return pd.DataFrame(oracle)
        keys = pd.DataFrame({"date": rows["date"].to_numpy().astype("datetime64[ns]"), "instrument": rows["instrument"].to_numpy(dtype=object)})
        return keys.merge(pd.DataFrame(oracle), on=["date", "instrument"], how="left")

    def bars(self, start=None, end=None) -> pd.DataFrame:
        """All bars at once (small markets, tests and demos)."""
        return pd.concat(list(self.iter_chunks(max(self.n_stocks, 1), start, end)), ignore_index=True)

    def factor_returns(self) -> pd.DataFrame:
        """Realised common factor returns f_{k,t} on the emitted days (date x factor_1..K)."""
        f = self._common["returns"][:, BURN_IN_DAYS:]
        return pd.DataFrame(f.T, index=pd.DatetimeIndex(self.calendar, name="date"),
                            columns=[f"factor_{k + 1}" for k in range(self.n_factors)])

    def _simulate(self, indices: list[int]) -> dict:
        key = tuple(indices)
        if self._cache is None or self._cache[0] != key:
            sim = _simulate_stocks(np.asarray(indices, dtype=np.int64), self.seed, self.n_days, self._common, self.params)
            sim["listing"], sim["delisting"] = self._listing[indices], self._delisting[indices]
            sim["codes"] = np.array([self.instruments[i] for i in indices], dtype=object)
            self._cache = (key, sim)
        return self._cache[1]


SyntheticSource = SyntheticMarket  # the BarSource name other modules use


def parse_synthetic_spec(spec: str) -> SyntheticMarket:
    """'synthetic' or 'synthetic:stocks=300,days=1000,seed=0,k=3,start=2015-01-05'."""
    settings = {"stocks": 300, "days": 1000, "seed": 0, "k": 3, "start": "2015-01-05"}
    body = spec.partition(":")[2].strip()
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in settings:
            raise ConfigError(
                f"--source {spec}: {item!r} is not a setting; expected key=value with keys {', '.join(settings)}"
            )
        if key == "start":
            settings[key] = value
            continue
        try:
            settings[key] = int(value)
        except ValueError:
            raise ConfigError(f"--source {spec}: {key}={value!r}, expected an integer") from None
    return SyntheticMarket(settings["stocks"], settings["days"], seed=settings["seed"], n_factors=settings["k"],
                           start=settings["start"])


# --------------------------------------------------------------------------------------------------
# simulation


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _ar1(noise: np.ndarray, phi: float, sd) -> np.ndarray:
    """AR(1) along the last axis with stationary sd `sd`, started from its stationary law."""
    innovations = noise * np.sqrt(1 - phi**2)
    innovations[..., 0] = noise[..., 0]
    return lfilter([1.0], [1.0, -phi], innovations * sd, axis=-1)


def _simulate_common(seed: int, n_factors: int, n_steps: int, p: SyntheticParams) -> dict:
    rng = _rng(seed, 0)
    premia = _ar1(rng.standard_normal((n_factors, n_steps)), p.premium_persistence, p.premium_sd)
    premia[0] += p.market_premium_mean
    vol = np.full((n_factors, n_steps), p.factor_vol)
    log_market_vol = _ar1(rng.standard_normal(n_steps), 0.97, 0.25)
    vol[0] = p.market_vol * np.exp(log_market_vol - 0.25**2)
    shocks = rng.standard_normal((n_factors, n_steps))
    loadings = rng.standard_normal((max(n_factors - 1, 0), N_CHARACTERISTICS))
    loadings /= np.linalg.norm(loadings, axis=1, keepdims=True)
    returns = vol * shocks
    returns[:, 2:] += premia[:, :-2]
    return {"premia": premia, "vol": vol, "shocks": shocks, "loadings": loadings, "returns": returns}


def _listing_days(seed: int, n_stocks: int, n_days: int, p: SyntheticParams) -> tuple[np.ndarray, np.ndarray]:
    """First bar day and one-past-last bar day of each stock (each from its own seeded stream)."""
    min_life = max(1, min(120, n_days // 4))
    delist_prob = 1 - np.exp(-p.delist_hazard_per_year * n_days / 250)
    listing = np.zeros(n_stocks, dtype=np.int64)
    delisting = np.full(n_stocks, n_days, dtype=np.int64)
    for i in range(n_stocks):
        draw = _rng(seed, 2, i).random(4)
        if draw[0] >= p.listed_at_start:
            listing[i] = 1 + int(draw[1] * max(n_days - min_life - 1, 0))
        if draw[2] < delist_prob:
            earliest = listing[i] + min_life
            delisting[i] = min(n_days, earliest + int(draw[3] * max(n_days - earliest, 0)))
    return listing, delisting


def _simulate_stocks(indices: np.ndarray, seed: int, n_days: int, common: dict, p: SyntheticParams) -> dict:
    n, steps = len(indices), n_days + BURN_IN_DAYS
    draws = {k: np.empty((n, steps)) for k in ("h", "eps", "v", "gap", "open", "high", "low", "suspend")}
    draws["char"] = np.empty((n, N_CHARACTERISTICS, steps))
    static = np.empty((n, N_CHARACTERISTICS + 2))
    for row, i in enumerate(indices):  # one stream per stock: chunking never changes a stock's draws
        rng = _rng(seed, 1, int(i))
        static[row] = rng.standard_normal(N_CHARACTERISTICS + 2)
        draws["char"][row] = rng.standard_normal((N_CHARACTERISTICS, steps))
        draws["h"][row] = rng.standard_normal(steps)
        draws["eps"][row] = rng.standard_t(p.t_dof, steps)
        draws["v"][row] = rng.standard_normal(steps)
        draws["gap"][row] = rng.random(steps)
        for name in ("open", "high", "low"):
            draws[name][row] = rng.standard_normal(steps)
        draws["suspend"][row] = rng.random(steps)

    # characteristics (n, 3, steps) and what they drive
    chars = 0.8 * static[:, :N_CHARACTERISTICS, None] + _ar1(draws["char"], p.char_persistence, 0.6)
    illiquidity, risk = chars[:, 0], chars[:, 1]
    log_vol = _ar1(draws["h"], p.vol_persistence, p.vol_of_vol)
    sigma = p.idio_vol * np.exp(p.risk_vol_loading * risk + log_vol - 0.5 * (p.risk_vol_loading**2 + p.vol_of_vol**2))
    eps = draws["eps"] * np.sqrt((p.t_dof - 2) / p.t_dof)
    shock = eps * np.concatenate([sigma[:, :1], sigma[:, :-1]], axis=1)  # u_t = sigma_{t-1} eps_t
    reversal_state = lfilter([1.0], [1.0, -p.reversal_decay], shock, axis=-1)
    surprise_sd = p.volume_surprise_sd * np.exp(p.illiquidity_volume_loading * illiquidity)
    surprise = _ar1(draws["v"], p.volume_persistence, surprise_sd)
    log_volume = 13.5 - 0.8 * illiquidity + surprise + 0.3 * np.abs(eps)

    # exposures (n, K, steps) and the expected return E_t of day t+2
    exposures = np.empty((n, len(common["premia"]), steps))
    exposures[:, 0] = 1 + 0.3 * np.tanh(risk) + 0.1 * static[:, N_CHARACTERISTICS, None]
    exposures[:, 1:] = 0.8 * np.tanh(np.einsum("kl,nls->nks", common["loadings"], chars))
    alpha = p.characteristic_alpha * (np.tanh(illiquidity) - np.tanh(risk))
    reversal = -p.reversal_strength * (1 - 0.5 * np.tanh(surprise / surprise_sd)) * reversal_state
    expected = alpha + reversal + np.einsum("nks,ks->ns", exposures, common["premia"])

    # realised simple returns: R_{t+2} = E_t + beta_t . (s z)_{t+2} + u_{t+2}
    factor_part = np.einsum("nks,ks->ns", exposures[:, :, :-2], (common["vol"] * common["shocks"])[:, 2:])
    ret = shock.copy()
    ret[:, 2:] += expected[:, :-2] + factor_part
    np.clip(ret, -p.return_clip, p.return_clip, out=ret)

    # emitted days only from here on
    day = slice(BURN_IN_DAYS, None)
    ret, sigma = ret[:, day], sigma[:, day]
    log_growth = np.cumsum(np.log1p(ret), axis=1)
    log_start = np.log(12.0) + 0.8 * static[:, N_CHARACTERISTICS + 1]
    return {
        "log_growth": log_growth,
        "log_start": log_start,
        "ret": ret,
        "sigma": sigma,
        "gap": draws["gap"][:, day],
        "open_noise": draws["open"][:, day],
        "high_noise": draws["high"][:, day],
        "low_noise": draws["low"][:, day],
        "suspended": draws["suspend"][:, day] < p.suspension_rate,
        "volume": np.maximum(100.0, np.round(np.exp(log_volume[:, day]) / 100) * 100),
        "expected_return": expected[:, day],
    }


def _long_rows(sim: dict, calendar: np.ndarray, lo, hi, columns: tuple[str, ...]) -> dict:
    """The bar rows (listed, not suspended, inside [lo, hi]) of a simulated chunk as long columns."""
    n, n_days = sim["ret"].shape
    t = np.arange(n_days)
    listed = (t >= sim["listing"][:, None]) & (t < sim["delisting"][:, None])
    # the first and last listed days always trade, so the membership interval matches the bars
    edge_day = (t == sim["listing"][:, None]) | (t == sim["delisting"][:, None] - 1)
    has_bar = listed & (~sim["suspended"] | edge_day)
    has_bar &= ((calendar >= lo) & (calendar <= hi))[None, :]
    rows, days = np.nonzero(has_bar)  # row-major: sorted by (instrument, date)
    out = {"date": calendar[days], "instrument": sim["codes"][rows]}
    if "expected_return" in columns:
        out["expected_return"] = sim["expected_return"][rows, days]
    if "close" in columns:
        out.update(_ohlc(sim, rows, days))
    return out


def _ohlc(sim: dict, rows: np.ndarray, days: np.ndarray) -> dict:
    """Prices of the selected (stock, day) cells; the path keeps moving on suspended days."""
    listing = sim["listing"][rows]
    base = sim["log_start"][rows] - sim["log_growth"][rows, listing]
    log_close = base + sim["log_growth"][rows, days]
    first = days == listing
    log_prev = np.where(first, log_close, base + sim["log_growth"][rows, np.maximum(days - 1, 0)])
    sigma = sim["sigma"][rows, days]
    # the open sits part of the way from the previous close towards the close, plus noise
    move = np.where(first, 0.0, np.log1p(sim["ret"][rows, days]))
    log_open = log_prev + sim["gap"][rows, days] * 0.5 * move + 0.2 * sigma * sim["open_noise"][rows, days]
    close, open_ = np.exp(log_close), np.exp(log_open)
    high = np.maximum(open_, close) * np.exp(0.4 * sigma * np.abs(sim["high_noise"][rows, days]))
    low = np.minimum(open_, close) * np.exp(-0.4 * sigma * np.abs(sim["low_noise"][rows, days]))
    return {"open": open_, "high": high, "low": low, "close": close, "volume": sim["volume"][rows, days], "factor": np.ones(len(rows))}
