"""The small-batch bf16 GEMM and the fused small ops against their torch references.

Exact (torch.equal) where the kernels claim it: rms_norm, fused_add_rms_norm, silu_and_mul, rope_and_cache in
fp32 and bf16. small_linear sums in fp32 in its own order, so it is checked against the fp64 product:
|out - exact| <= 2^-8 |exact| + 2 K 2^-24 sum|x w| (the bf16 rounding plus fp32 accumulation error).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepflow.engine import kernels
from deepflow.engine.kernels import fused, linear

OPS = ("pack_linear_weight", "small_linear", "rms_norm", "fused_add_rms_norm", "silu_and_mul")
OPS += ("rope_and_cache", "init_cpu_threads")
pytestmark = pytest.mark.skipif(
    not kernels.available(*OPS),
    reason=f"deepflow kernels unavailable or stale: {kernels.unavailable_reason() or 'ops missing'}",
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(
    g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ---- small_linear ----------------------------------------------------------------------------------------


def check_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    exact = x.double() @ w.double().T
    if bias is not None:
        exact = exact + bias.double()
    k = x.shape[-1]
    gamma = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    err = (out.double() - exact).abs()
    bound = 2.0**-8 * exact.abs() + gamma + 1e-30
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


@SETTINGS
@given(
    m=st.integers(1, 8),
    n=st.integers(1, 130),
    k=st.integers(1, 200),
    bias=st.sampled_from([None, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_small_linear_matches_fp64(m: int, n: int, k: int, bias: torch.dtype | None, seed: int) -> None:
    g = gen(seed)
    w = randn(g, n, k, dtype=torch.bfloat16)
    x = randn(g, m, k, dtype=torch.bfloat16)
    b = randn(g, n, dtype=bias) if bias is not None else None
    packed = linear.pack_linear_weight(w)
    assert linear.packed_shape(packed) == (n, k)
    out = linear.small_linear(x, packed, b, n)
    check_linear(x, w, b, out)
    # The torch reference agrees to the same bound (it differs only in the fp32 summation order).
    check_linear(x, w, b, linear.small_linear_reference(x, w, b))


@settings(max_examples=15, deadline=None)
@given(m=st.integers(9, 80), n=st.integers(1, 100), k=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_small_linear_more_rows(m: int, n: int, k: int, seed: int) -> None:
    g = gen(seed)
    w = randn(g, n, k, dtype=torch.bfloat16)
    x = randn(g, m, k, dtype=torch.bfloat16)
    check_linear(x, w, None, linear.small_linear(x, linear.pack_linear_weight(w), None, n))


@pytest.mark.parametrize("n,k", [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)])
def test_small_linear_model_shapes(n: int, k: int) -> None:
    g = gen(n * k)
    w = randn(g, n, k, dtype=torch.bfloat16, scale=0.05)
    packed = linear.pack_linear_weight(w)
    for m in (1, 4, 8):
        x = randn(g, m, k, dtype=torch.bfloat16)
        check_linear(x, w, None, linear.small_linear(x, packed, None, n))


def test_small_linear_shapes_and_checks() -> None:
    g = gen(0)
    w = randn(g, 33, 17, dtype=torch.bfloat16)
    packed = linear.pack_linear_weight(w)
    x = randn(g, 2, 3, 17, dtype=torch.bfloat16)
    out = linear.small_linear(x, packed, None, 33)
    assert out.shape == (2, 3, 33)
    check_linear(x.reshape(6, 17), w, None, out.reshape(6, 33))
    assert linear.small_linear(x[:0, 0], packed, None, 33).shape == (0, 33)
    # A non-contiguous x (a column slice) is read correctly.
    wide = randn(g, 4, 40, dtype=torch.bfloat16)
    check_linear(wide[:, 5:22], w, None, linear.small_linear(wide[:, 5:22], packed, None, 33))
    with pytest.raises(RuntimeError, match="out_features"):
        linear.small_linear(x, packed, None, 32)
    with pytest.raises(RuntimeError, match="K ="):
        linear.small_linear(randn(g, 2, 18, dtype=torch.bfloat16), packed, None, 33)
    with pytest.raises(RuntimeError, match="pack_linear_weight"):
        linear.small_linear(x, torch.zeros(packed.numel(), dtype=torch.bfloat16), None, 33)
    with pytest.raises(RuntimeError, match="bias"):
        linear.small_linear(x, packed, torch.zeros(32), 33)
    with pytest.raises(RuntimeError, match="bfloat16"):
        linear.pack_linear_weight(w.float())


# ---- rms_norm, fused_add_rms_norm ------------------------------------------------------------------------

H_VALUES = st.one_of(st.integers(1, 40), st.integers(41, 3000), st.sampled_from([576, 1536, 4096, 8192]))


@SETTINGS
@given(
    dtype=DTYPES,
    t=st.integers(1, 12),
    h=H_VALUES,
    eps=st.sampled_from([1e-5, 1e-6, 1e-3]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rms_norm_exact(
    dtype: torch.dtype, t: int, h: int, eps: float, scale: float, strided: bool, seed: int
) -> None:
    g = gen(seed)
    x = randn(g, t, h + 3 if strided else h, dtype=dtype, scale=scale)[:, :h]
    w = randn(g, h, dtype=dtype)
    expected = torch.empty(t, h, dtype=dtype)
    fused.rms_norm_reference(expected, x, w, eps)
    out = torch.empty(t, h, dtype=dtype)
    torch.ops.deepflow.rms_norm(out, x, w, eps)
    assert torch.equal(out, expected)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 6), h=H_VALUES, seed=st.integers(0, 2**31 - 1))
def test_rms_norm_fp32_is_the_models(t: int, h: int, seed: int) -> None:
    from deepflow.engine.models.llama import RMSNorm

    g = gen(seed)
    norm = RMSNorm(h, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(randn(g, h))
    x = randn(g, t, h, scale=3.0)
    with torch.inference_mode():
        expected = norm(x)
        expected = expected[0] if isinstance(expected, tuple) else expected  # (normed, residual) or normed
        assert torch.equal(fused.rms_norm(x, norm.weight.detach(), 1e-6), expected)


@SETTINGS
@given(
    dtype=DTYPES,
    t=st.integers(1, 12),
    h=H_VALUES,
    eps=st.sampled_from([1e-5, 1e-6]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_add_rms_norm_exact(dtype: torch.dtype, t: int, h: int, eps: float, seed: int) -> None:
    g = gen(seed)
    x = randn(g, t, h, dtype=dtype, scale=2.0)
    residual = randn(g, t, h, dtype=dtype, scale=5.0)
    w = randn(g, h, dtype=dtype)
    x_ref, r_ref = x.clone(), residual.clone()
    fused.fused_add_rms_norm_reference(x_ref, r_ref, w, eps)
    torch.ops.deepflow.fused_add_rms_norm(x, residual, w, eps)
    assert torch.equal(residual, r_ref)
    assert torch.equal(x, x_ref)


def test_rms_norm_checks() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.deepflow.rms_norm(torch.empty_like(x), x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="last dim"):
        torch.ops.deepflow.rms_norm(torch.empty_like(x), x, torch.ones(7), 1e-6)


# ---- silu_and_mul ----------------------------------------------------------------------------------------


@SETTINGS
@given(
    dtype=DTYPES,
    m=st.integers(1, 16),
    inter=st.one_of(st.integers(1, 200), st.integers(201, 2100), st.just(1536)),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_silu_and_mul_exact(dtype: torch.dtype, m: int, inter: int, scale: float, seed: int) -> None:
    g = gen(seed)
    x = randn(g, m, 2 * inter, dtype=dtype, scale=scale)
    expected = torch.empty(m, inter, dtype=dtype)
    fused.silu_and_mul_reference(expected, x)
    out = torch.empty(m, inter, dtype=dtype)
    torch.ops.deepflow.silu_and_mul(out, x)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,inter", [(24, 1536), (33, 1001), (1, 40000), (3, 70001)])
def test_silu_and_mul_exact_when_torch_splits_across_threads(dtype: torch.dtype, m: int, inter: int) -> None:
    # Above 32768 elements torch splits the work between threads mid-row; the kernel splits the same way.
    x = randn(gen(m * inter), m, 2 * inter, dtype=dtype, scale=4.0)
    expected = torch.empty(m, inter, dtype=dtype)
    fused.silu_and_mul_reference(expected, x)
    assert torch.equal(fused.silu_and_mul(x), expected)


# ---- rope_and_cache --------------------------------------------------------------------------------------


@st.composite
def rope_cases(draw: st.DrawFn) -> dict:
    kvh = draw(st.integers(1, 4))
    group = draw(st.integers(1, 4))
    hd = 2 * draw(st.one_of(st.integers(1, 40), st.just(32), st.just(64)))
    bs = draw(st.integers(1, 16))
    t = draw(st.integers(1, 20))
    nb = draw(st.integers(-(-t // bs), -(-t // bs) + 4))
    return dict(
        dtype=draw(DTYPES), t=t, heads=kvh * group, kvh=kvh, hd=hd, bs=bs, nb=nb,
        pad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


@SETTINGS
@given(case=rope_cases())
def test_rope_and_cache_exact(case: dict) -> None:
    dtype, t, heads, kvh, hd, bs, nb = (case[k] for k in ("dtype", "t", "heads", "kvh", "hd", "bs", "nb"))
    g = gen(case["seed"])
    max_pos = 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # qk and v as the model has them: views into one qkv projection output.
    qkv = randn(g, t, (heads + 2 * kvh) * hd, dtype=dtype, scale=2.0)
    qk, v = qkv.split([(heads + kvh) * hd, kvh * hd], dim=-1)
    qk, v = qk.view(t, heads + kvh, hd), v.view(t, kvh, hd)
    positions = torch.randint(0, max_pos, (t,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    if case["pad"]:
        slots[torch.rand(t, generator=g) < 0.3] = -1
    k_cache = randn(g, kvh, nb, bs, hd, dtype=dtype)
    v_cache = randn(g, kvh, nb, bs, hd, dtype=dtype)
    qk_ref, kc_ref, vc_ref = qk.clone(), k_cache.clone(), v_cache.clone()
    fused.rope_and_cache_reference(qk_ref, v, cos, sin, positions, kc_ref, vc_ref, slots, heads, kvh)
    torch.ops.deepflow.rope_and_cache(qk, v, cos, sin, positions, k_cache, v_cache, slots, heads, kvh)
    assert torch.equal(qk, qk_ref)
    assert torch.equal(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)


def test_rope_and_cache_is_the_models_bf16_arithmetic() -> None:
    # The model's own expression (engine/attention/torch_backend.py) on SmolLM2's shapes.
    from deepflow.engine.attention.torch_backend import _rotate_half

    g = gen(7)
    t, heads, kvh, hd = 5, 9, 3, 64
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(torch.arange(2048, dtype=torch.float32), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    qk = randn(g, t, heads + kvh, hd, dtype=torch.bfloat16)
    v = randn(g, t, kvh, hd, dtype=torch.bfloat16)
    positions = torch.tensor([0, 1, 700, 2000, 2047])
    expected = qk * cos[positions].unsqueeze(1) + _rotate_half(qk) * sin[positions].unsqueeze(1)
    k_cache = torch.zeros(kvh, 4, 16, hd, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    fused.rope_and_cache(
        qk, v, cos, sin, positions, k_cache, v_cache, torch.tensor([3, 17, 18, 40, 63]), heads, kvh
    )
    assert torch.equal(qk, expected)
    assert torch.equal(k_cache[:, 1, 1], expected[1, heads:])
    assert torch.equal(v_cache[:, 3, 15], v[4])


def test_rope_and_cache_checks() -> None:
    qk, v = torch.randn(2, 3, 8), torch.randn(2, 1, 8)
    cos = sin = torch.randn(4, 8)
    cache = torch.zeros(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="position"):
        torch.ops.deepflow.rope_and_cache(qk, v, cos, sin, torch.tensor([0, 4]), cache, cache.clone(),
                                          torch.tensor([0, 1]), 2, 1)  # fmt: skip
    with pytest.raises(RuntimeError, match="slot"):
        torch.ops.deepflow.rope_and_cache(qk, v, cos, sin, torch.tensor([0, 1]), cache, cache.clone(),
                                          torch.tensor([0, 4]), 2, 1)  # fmt: skip
    with pytest.raises(RuntimeError, match="heads"):
        torch.ops.deepflow.rope_and_cache(qk, v, cos, sin, torch.tensor([0, 1]), cache, cache.clone(),
                                          torch.tensor([0, 1]), 1, 1)  # fmt: skip


# ---- init_cpu_threads ------------------------------------------------------------------------------------


def test_init_cpu_threads_pins_torchs_team() -> None:
    # In a child process: pinning is process-wide state this test process must keep.
    cpus = sorted(os.sched_getaffinity(0))
    ids = cpus[:2] if len(cpus) >= 2 else cpus * 2
    script = textwrap.dedent(
        f"""
        import os, torch
        from deepflow.engine.kernels import fused
        fused.init_cpu_threads({ids!r})
        assert torch.get_num_threads() == {len(ids)}, torch.get_num_threads()
        assert os.sched_getaffinity(0) == {{{ids[0]}}}, os.sched_getaffinity(0)
        # Torch's parallel ops still run (on the pinned team), then every thread's CPU list is read.
        x = torch.randn(2048, 2048)
        assert torch.equal(x * 2 + x, x * 3)
        pinned = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{{tid}}/status") as f:
                line = [l for l in f if l.startswith("Cpus_allowed_list")][0]
            pinned.append(line.split()[1])
        print(sorted(pinned))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    allowed = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    for cpu in set(ids):
        assert str(cpu) in allowed, (ids, allowed)


def test_init_cpu_threads_rejects_bad_ids() -> None:
    with pytest.raises(RuntimeError, match="cpu"):
        fused.init_cpu_threads([])
