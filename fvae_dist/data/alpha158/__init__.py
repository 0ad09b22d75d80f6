"""The Alpha158 feature engine behind data/features.py.

    catalogue.py   the 158 features and LABEL0 (names in Qlib's order, one definition each) and the
                   per-chunk cache of the series and rolling statistics they share
    moments.py     window sums, means, variances, correlations and regressions on time
    order.py       window max/min, their positions, quantiles and ranks
"""
