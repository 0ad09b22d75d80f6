"""Round a batch's row count up, so that the matrix products see few distinct shapes.

    zero_rows_to_bucket(x_real) -> x_real with zero rows appended, S' = multiple of ROW_BUCKET

Why: oneDNN builds (JIT-compiles) and caches a kernel per matrix shape for bf16 products.
Several days per step give a new number of real stocks S almost every step (sums of several days'
stock counts), more shapes than its primitive cache holds (1,024 kernels; each S needs about
ten), so it kept building kernels and the process kept growing by their code. Measured on one
core, bf16, 4 days per step (S about 1,000): 25.2-25.8 ms a step on new day groupings against
23.4-23.6 ms replaying groupings it had seen; with S rounded up to a multiple of 16,
22.9-23.3 ms either way, and about 13 shapes in place of about 200. fp32 did not change.

Callers use it where they gather the real stocks of a padded batch anyway (one day per step needs
no gather, and a day's ~50 distinct stock counts fit the cache). The zero rows are independent
sequences or rows, dropped before anything reads the output: zeros, not padded slots' contents,
so that nothing non-finite can reach a weight gradient through them.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

ROW_BUCKET = 16


def zero_rows_to_bucket(x_real: Tensor) -> Tensor:
    """(S, ...) -> (S', ...) with S' the smallest multiple of ROW_BUCKET >= S; rows S.. are 0."""
    extra = -x_real.shape[0] % ROW_BUCKET
    if not extra:
        return x_real
    return F.pad(x_real, (0, 0) * (x_real.dim() - 1) + (0, extra))
