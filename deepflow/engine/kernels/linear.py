"""Small-batch bf16 linear layers (decode: 1-64 rows) over weights repacked once for AVX512-BF16.

`pack_linear_weight(w)` turns a bf16 [N, K] weight into the kernel's layout (a 1-D bf16 tensor: a 64-byte
header recording N and K, then tiles of 16 output columns x K with K pairs interleaved for
`_mm512_dpbf16_ps`, K padded to even, N to a multiple of 16; about the weight's own size). `small_linear`
then computes x @ w.T (+ bias) for x [..., K] bf16 -> [..., N] bf16 with fp32 accumulation, the bias added in
fp32 and one rounding at the end, streaming each weight byte once per call for up to 16 rows (more rows
work in passes of 8 rows x 3 column tiles that re-read the tiles from L2). The threads split the columns.

Against the oneDNN-packed linear the model uses (`torch.ops.mkldnn._linear_pointwise`) this was faster at
every row count 1-16 for each SmolLM2 shape and the LM head, and over the whole decode step's projections
up to M = 48 (parity at 64); benchmarks/linear_kernels.py measures it.
The packed layout is the kernel's own: these functions need the kernel library.
"""

from __future__ import annotations

import torch

from deepflow.engine import kernels

# Rows a call reads the weight once for; above it the tiles are re-read from L1/L2 per 16 rows.
MAX_ROWS = 16
HEADER_ELEMENTS = 32  # 64 bytes of the packed tensor
_MAGIC = 0x57504644


def _require() -> None:
    if not kernels.available("pack_linear_weight", "small_linear"):
        raise RuntimeError(f"deepflow kernels unavailable: {kernels.unavailable_reason() or 'not loaded'}")


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> the packed layout `small_linear` streams (done once, at load)."""
    _require()
    return torch.ops.deepflow.pack_linear_weight(weight)


def packed_shape(packed: torch.Tensor) -> tuple[int, int]:
    """(N, K) as recorded in a packed weight's header."""
    header = packed[:HEADER_ELEMENTS].view(torch.int32)
    if int(header[0]) != _MAGIC:
        raise ValueError("not a weight packed by pack_linear_weight")
    return int(header[2]), int(header[3])


def small_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [..., K] bf16 @ the packed weight (+ bias, bf16 or fp32) -> [..., out_features] bf16."""
    return torch.ops.deepflow.small_linear(x, packed, bias, out_features)


def small_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same contract in torch: fp32 products and sums, bias in fp32, one rounding to bf16.

    Only the order of the fp32 additions differs from the kernel (which sums K pairs in sequence), so the
    two agree to fp32 rounding before the final bf16 rounding, i.e. within 1 bf16 ulp.
    """
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(torch.bfloat16)
