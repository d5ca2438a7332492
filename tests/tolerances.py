"""Tolerances derived from the formats' precision (NUMERICS.md), not tuned to pass.

- e4m3 has 3 mantissa bits: one round-to-nearest moves a normal value by at most 2^-4 of itself.
- bf16 has 7 mantissa bits (8 significant): one rounding moves a value by at most 2^-8 of itself; one bf16
  ulp at x is 2^(floor(log2|x|) - 7).
- fp16 has 10 mantissa bits: 2^-11 relative per rounding.
"""

import math

import torch

E4M3_REL = 2.0**-4  # half an e4m3 ulp, relative, normal range
BF16_REL = 2.0**-8  # half a bf16 ulp, relative
FP16_REL = 2.0**-11
#: One extra e4m3 rounding: noise <= 2^-8 signal -> SQNR >= 20*log10(2^4) = 24.08 dB.
REQUANT_SQNR_FLOOR_DB = 20 * math.log10(2**4)
#: The report's SQNR takes per-row fp32 norms (blocked, vectorized sums: ~log2(K) * 2^-24 relative, K <= 2^14
#: here, so <= ~1e-6) and sums them exactly in fp64 (thread-count independent): |error| <= 10*log10(1 + 2e-6)
#: ~ 1e-5 dB; compared at 1e-4 dB.
SQNR_DB_ABS = 1e-4


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (fp32), for normal values."""
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0**-126)))
    return torch.pow(2.0, e - 7)
