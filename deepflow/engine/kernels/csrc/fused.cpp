// Fused small ops of the decoder layer (fp32 and bf16), each reproducing torch's own arithmetic:
//   rms_norm / fused_add_rms_norm  HF order: x32 * rsqrt(mean(x32^2) + eps) -> dtype -> * weight (in the dtype);
//                                  the sum of squares follows ATen's cascade sum (SumKernel.cpp, AVX2 build) step by step.
//   silu_and_mul                   F.silu(gate) * up: ATen's silu (Sleef exp on vector chunks, libm expf on
//                                  each loop's scalar tail, split exactly where ATen's loop splits), then mul.
//   rope_and_cache                 qk * cos + rotate_half(qk) * sin with a rounding per op in the dtype, then
//                                  the k heads and v written into [KVH, NB, BS, hd] caches at slot_mapping.
//   init_cpu_threads               torch's OpenMP team, one thread pinned per listed CPU.
#include "gemv_util.h"

#include <omp.h>
#include <sched.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <vector>

namespace deepflow {
namespace {

// ---------------------------------------------------------------------------------------------------------
// ATen's cascade sum (aten/src/ATen/native/cpu/SumKernel.cpp), for the inner (contiguous) reduction of one
// row of x32^2: the same association of additions, so the fp32 sum is bit-identical with
// `x.float().pow(2).sum(-1)` (and mean = sum / H, as ATen's CPU mean does).

static inline __m256 acc_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
static inline float acc_add(float a, float b) { return a + b; }
template <typename A>
static inline A acc_zero();
template <>
inline __m256 acc_zero<__m256>() { return _mm256_setzero_ps(); }
template <>
inline float acc_zero<float>() { return 0.0f; }

static inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return (63 - __builtin_clzll(static_cast<uint64_t>(x) - 1)) + 1;
}

// multi_row_sum<acc, nrows=4> over `size` groups of 4 consecutive items; item(i) loads item i.
template <typename A, typename Item>
static inline std::array<A, 4> multi_row_sum4(const Item& item, int64_t size) {
  constexpr int64_t kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  A acc[kLevels][4];
  for (auto& lv : acc)
    for (auto& a : lv) a = acc_zero<A>();
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int k = 0; k < 4; ++k) acc[0][k] = acc_add(acc[0][k], item(i * 4 + k));
    }
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = acc_add(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = acc_zero<A>();
      }
      const int64_t mask = level_mask << (j * level_power);
      if ((i & mask) != 0) break;
    }
  }
  for (; i < size; ++i) {
    for (int k = 0; k < 4; ++k) acc[0][k] = acc_add(acc[0][k], item(i * 4 + k));
  }
  for (int64_t j = 1; j < kLevels; ++j) {
    for (int k = 0; k < 4; ++k) acc[0][k] = acc_add(acc[0][k], acc[j][k]);
  }
  return {acc[0][0], acc[0][1], acc[0][2], acc[0][3]};
}

// row_sum: the items as a (-1, 4) array, the leftovers into partial 0, then the partials in order.
template <typename A, typename Item>
static inline A row_sum(const Item& item, int64_t size) {
  const int64_t size_ilp = size / 4;
  std::array<A, 4> partial = multi_row_sum4<A>(item, size_ilp);
  for (int64_t i = size_ilp * 4; i < size; ++i) partial[0] = acc_add(partial[0], item(i));
  for (int k = 1; k < 4; ++k) partial[0] = acc_add(partial[0], partial[k]);
  return partial[0];
}

template <typename scalar_t>
static inline float sq(scalar_t v) {
  const float f = static_cast<float>(v);
  return f * f;
}

// sum(x32^2) over one contiguous row of h elements, in ATen's order: vectorized_inner_sum when h >= 8,
// scalar_inner_sum otherwise. ATen registers its sum kernel without an AVX-512 variant, so on this CPU it
// is the AVX2 build that runs: 8-lane vectors.
template <typename scalar_t>
static inline __m256 load8_as_fp32(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

template <typename scalar_t>
static float sum_of_squares(const scalar_t* x, int64_t h) {
  constexpr int64_t kLanes = 8;
  if (h >= kLanes) {
    const int64_t vec_size = h / kLanes;
    auto vitem = [x](int64_t i) {
      const __m256 v = load8_as_fp32(x + i * kLanes);
      return _mm256_mul_ps(v, v);
    };
    const __m256 vacc = row_sum<__m256>(vitem, vec_size);
    float total = 0.0f;
    for (int64_t k = vec_size * kLanes; k < h; ++k) total += sq(x[k]);
    alignas(32) float partials[kLanes];
    _mm256_store_ps(partials, vacc);
    for (int k = 0; k < kLanes; ++k) total += partials[k];
    return total;
  }
  auto sitem = [x](int64_t i) { return sq(x[i]); };
  return row_sum<float>(sitem, h);
}

// out[i] = weight[i] * dtype(x32[i] * r), rounded as torch does per op.
template <typename scalar_t>
static inline void scale_row(scalar_t* out, const scalar_t* x, const scalar_t* w, float r, int64_t h) {
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 xv = load_as_fp32_masked(x + i, m);
    const __m512 y = round_to<scalar_t>(_mm512_mul_ps(xv, rv));
    const __m512 wv = load_as_fp32_masked(w + i, m);
    store_torch_masked(out + i, _mm512_mul_ps(wv, y), m);
  }
}

static inline float inv_rms(float sum, int64_t h, float eps) {
  const float mean = sum / static_cast<float>(h);
  return 1.0f / std::sqrt(mean + eps);
}

struct Rows {
  int64_t rows, stride;
};

// A tensor as rows of `h` contiguous elements: [..., h] contiguous, or 2-D with a row stride.
static Rows as_rows(const at::Tensor& t, int64_t h, const char* what) {
  DF_CHECK(t.dim() >= 1 && t.size(-1) == h, what, " must have last dim ", h, ", got ", t.sizes());
  if (t.is_contiguous()) return {h ? t.numel() / h : 0, h};
  DF_CHECK(t.dim() == 2 && t.stride(1) == 1, what, " must be contiguous or 2-D with contiguous rows, got strides ",
           t.strides());
  return {t.size(0), t.stride(0)};
}

static int64_t row_grain(int64_t h) { return std::max<int64_t>(1, (int64_t(32) << 10) / std::max<int64_t>(h, 1)); }

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  DF_CHECK(x.is_cpu() && out.is_cpu() && weight.is_cpu(), "rms_norm: CPU tensors only");
  DF_CHECK(out.dtype() == x.dtype() && weight.dtype() == x.dtype(), "rms_norm: out, x and weight must share a dtype");
  DF_CHECK(weight.dim() == 1 && weight.is_contiguous(), "rms_norm: weight must be a contiguous 1-D tensor");
  const int64_t h = weight.size(0);
  const Rows xr = as_rows(x, h, "rms_norm: x");
  const Rows orow = as_rows(out, h, "rms_norm: out");
  DF_CHECK(xr.rows == orow.rows, "rms_norm: out has ", orow.rows, " rows, x has ", xr.rows);
  const float feps = static_cast<float>(eps);
  DF_DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    const scalar_t* wd = weight.data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    at::parallel_for(0, xr.rows, row_grain(h), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xrow = xd + r * xr.stride;
        const float inv = inv_rms(sum_of_squares(xrow, h), h, feps);
        scale_row(od + r * orow.stride, xrow, wd, inv, h);
      }
    });
  });
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  DF_CHECK(x.is_cpu() && residual.is_cpu() && weight.is_cpu(), "fused_add_rms_norm: CPU tensors only");
  DF_CHECK(residual.dtype() == x.dtype() && weight.dtype() == x.dtype(),
           "fused_add_rms_norm: x, residual and weight must share a dtype");
  DF_CHECK(weight.dim() == 1 && weight.is_contiguous(), "fused_add_rms_norm: weight must be a contiguous 1-D tensor");
  const int64_t h = weight.size(0);
  const Rows xr = as_rows(x, h, "fused_add_rms_norm: x");
  const Rows rr = as_rows(residual, h, "fused_add_rms_norm: residual");
  DF_CHECK(xr.rows == rr.rows, "fused_add_rms_norm: residual has ", rr.rows, " rows, x has ", xr.rows);
  const float feps = static_cast<float>(eps);
  DF_DISPATCH_FLOAT_BF16(x.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* xd = x.data_ptr<scalar_t>();
    scalar_t* rd = residual.data_ptr<scalar_t>();
    const scalar_t* wd = weight.data_ptr<scalar_t>();
    at::parallel_for(0, xr.rows, row_grain(h), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xrow = xd + r * xr.stride;
        scalar_t* rrow = rd + r * rr.stride;
        for (int64_t i = 0; i < h; i += 16) {
          const __mmask16 m = tail_mask(h - i);
          const __m512 s = _mm512_add_ps(load_as_fp32_masked(rrow + i, m), load_as_fp32_masked(xrow + i, m));
          store_torch_masked(rrow + i, s, m);
        }
        const float inv = inv_rms(sum_of_squares(static_cast<const scalar_t*>(rrow), h), h, feps);
        scale_row(xrow, rrow, wd, inv, h);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// silu_and_mul. ATen's silu runs cpu_kernel_vec: each contiguous run its loop is handed (a row, or the part
// of a row inside one thread's chunk of at::parallel_for(0, numel, GRAIN_SIZE)) goes through the vector op
// in steps of 2 vectors (32 fp32 / 64 bf16 elements) and the rest through the scalar op (std::exp).
// kPiece below is a multiple of both steps.

constexpr int64_t kAtenGrain = 32768;  // at::internal::GRAIN_SIZE, what TensorIterator::for_each uses

static inline __m512 silu_vec(__m512 g) {
  const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(_mm512_set1_ps(-0.0f), g));
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

template <typename scalar_t>
static inline void silu_mul_run(scalar_t* out, const scalar_t* gate, const scalar_t* up, int64_t n) {
  constexpr int64_t step = std::is_same_v<scalar_t, float> ? 32 : 64;
  int64_t i = 0;
  for (; i + step <= n; i += step) {
    for (int64_t j = i; j < i + step; j += 16) {
      const __m512 s = round_to<scalar_t>(silu_vec(load_as_fp32(gate + j)));
      store_torch(out + j, _mm512_mul_ps(s, load_as_fp32(up + j)));
    }
  }
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const scalar_t s = static_cast<scalar_t>(g / (1.0f + std::exp(-g)));
    out[i] = static_cast<scalar_t>(static_cast<float>(s) * static_cast<float>(up[i]));
  }
}

struct SiluPiece {
  int64_t row, col, n;
};

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  DF_CHECK(x.is_cpu() && out.is_cpu(), "silu_and_mul: CPU tensors only");
  DF_CHECK(out.dtype() == x.dtype(), "silu_and_mul: out and x must share a dtype");
  DF_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: x's last dim must be even, got ", x.sizes());
  const int64_t inter = x.size(-1) / 2;
  const Rows xr = as_rows(x, 2 * inter, "silu_and_mul: x");
  const Rows orow = as_rows(out, inter, "silu_and_mul: out");
  DF_CHECK(xr.rows == orow.rows, "silu_and_mul: out has ", orow.rows, " rows, x has ", xr.rows);
  const int64_t numel = xr.rows * inter;
  if (numel == 0) return;
  // The runs ATen's loop sees: each row, cut where at::parallel_for(0, numel, GRAIN_SIZE) would cut it
  // between threads (only above GRAIN_SIZE elements).
  const int64_t threads = at::get_num_threads();
  int64_t torch_chunk = numel;
  if (numel > kAtenGrain && threads > 1 && !at::in_parallel_region()) {
    const int64_t nt = std::min(threads, (numel + kAtenGrain - 1) / kAtenGrain);
    torch_chunk = (numel + nt - 1) / nt;
  }
  // Runs split further into pieces of a multiple of the vector step (so every element takes the same
  // path, vector or scalar tail, as in ATen), which this op spreads over the threads itself.
  constexpr int64_t kPiece = 1024;
  std::vector<SiluPiece> pieces;
  pieces.reserve(static_cast<size_t>(numel / kPiece + 2 * xr.rows + 2));
  for (int64_t e = 0; e < numel;) {
    const int64_t r = e / inter, c = e % inter;
    const int64_t chunk_end = (e / torch_chunk + 1) * torch_chunk;
    const int64_t n = std::min(chunk_end - e, inter - c);
    for (int64_t off = 0; off < n; off += kPiece) pieces.push_back({r, c + off, std::min(kPiece, n - off)});
    e += n;
  }
  const int64_t npieces = static_cast<int64_t>(pieces.size());
  DF_DISPATCH_FLOAT_BF16(x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    // ~4K elements a thread at least (a few microseconds; waking the other core costs about one).
    at::parallel_for(0, npieces, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const SiluPiece& p = pieces[i];
        const scalar_t* xrow = xd + p.row * xr.stride;
        silu_mul_run(od + p.row * orow.stride + p.col, xrow + p.col, xrow + inter + p.col, p.n);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// rope_and_cache

template <typename scalar_t>
static inline void rope_head(scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    const __m512 x1 = load_as_fp32_masked(x + i, m);
    const __m512 x2 = load_as_fp32_masked(x + half + i, m);
    const __m512 c1 = load_as_fp32_masked(cos + i, m), c2 = load_as_fp32_masked(cos + half + i, m);
    const __m512 s1 = load_as_fp32_masked(sin + i, m), s2 = load_as_fp32_masked(sin + half + i, m);
    const __m512 neg_x2 = _mm512_xor_ps(_mm512_set1_ps(-0.0f), x2);
    // first half: x1*cos1 + (-x2)*sin1; second half: x2*cos2 + x1*sin2 (each product and the sum rounded)
    const __m512 o1 =
        _mm512_add_ps(round_to<scalar_t>(_mm512_mul_ps(x1, c1)), round_to<scalar_t>(_mm512_mul_ps(neg_x2, s1)));
    const __m512 o2 =
        _mm512_add_ps(round_to<scalar_t>(_mm512_mul_ps(x2, c2)), round_to<scalar_t>(_mm512_mul_ps(x1, s2)));
    store_torch_masked(x + i, o1, m);
    store_torch_masked(x + half + i, o2, m);
  }
}

void rope_and_cache(at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& positions, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  DF_CHECK(qk.is_cpu() && v.is_cpu() && k_cache.is_cpu() && v_cache.is_cpu(), "rope_and_cache: CPU tensors only");
  DF_CHECK(qk.dim() == 3 && v.dim() == 3, "rope_and_cache: qk must be [T, H+KVH, hd] and v [T, KVH, hd]");
  const int64_t tokens = qk.size(0), hd = qk.size(2);
  DF_CHECK(qk.size(1) == num_heads + num_kv_heads, "rope_and_cache: qk has ", qk.size(1), " heads, expected ",
           num_heads + num_kv_heads);
  DF_CHECK(v.size(0) == tokens && v.size(1) == num_kv_heads && v.size(2) == hd, "rope_and_cache: v must be [",
           tokens, ", ", num_kv_heads, ", ", hd, "], got ", v.sizes());
  DF_CHECK(hd % 2 == 0, "rope_and_cache: head_dim must be even, got ", hd);
  DF_CHECK(qk.stride(2) == 1 && v.stride(2) == 1, "rope_and_cache: qk and v need a contiguous head_dim");
  const auto dt = qk.scalar_type();
  DF_CHECK(v.scalar_type() == dt && cos.scalar_type() == dt && sin.scalar_type() == dt &&
               k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
           "rope_and_cache: qk, v, cos, sin and the caches must share a dtype");
  DF_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(1) == hd && cos.is_contiguous() &&
               sin.is_contiguous(),
           "rope_and_cache: cos/sin must be contiguous [max_pos, ", hd, "]");
  DF_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong,
           "rope_and_cache: positions and slot_mapping must be int64");
  DF_CHECK(positions.dim() == 1 && positions.size(0) == tokens && slot_mapping.dim() == 1 &&
               slot_mapping.size(0) == tokens,
           "rope_and_cache: positions and slot_mapping must be [", tokens, "]");
  DF_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == num_kv_heads &&
               k_cache.size(3) == hd,
           "rope_and_cache: caches must be [", num_kv_heads, ", NB, BS, ", hd, "], got ", k_cache.sizes(), " and ",
           v_cache.sizes());
  DF_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "rope_and_cache: caches need a contiguous head_dim");
  const int64_t max_pos = cos.size(0), block_size = k_cache.size(2);
  const int64_t num_slots = k_cache.size(1) * block_size;
  const at::Tensor pos = positions.contiguous(), slots = slot_mapping.contiguous();
  const int64_t* pd = pos.data_ptr<int64_t>();
  const int64_t* sd = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    DF_CHECK(pd[t] >= 0 && pd[t] < max_pos, "rope_and_cache: position ", pd[t], " outside [0, ", max_pos, ")");
    DF_CHECK(sd[t] < num_slots, "rope_and_cache: slot ", sd[t], " outside the cache's ", num_slots, " slots");
  }
  const int64_t heads = num_heads + num_kv_heads, half = hd / 2;
  const int64_t per_token = (heads + 2 * num_kv_heads) * hd;
  DF_DISPATCH_FLOAT_BF16(dt, "rope_and_cache", [&] {
    scalar_t* qd = qk.data_ptr<scalar_t>();
    const scalar_t* vd = v.data_ptr<scalar_t>();
    const scalar_t* cd = cos.data_ptr<scalar_t>();
    const scalar_t* snd = sin.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    const int64_t qs0 = qk.stride(0), qs1 = qk.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
    const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
    const int64_t cs0 = v_cache.stride(0), cs1 = v_cache.stride(1), cs2 = v_cache.stride(2);
    at::parallel_for(0, tokens, std::max<int64_t>(1, kAtenGrain / per_token), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cd + pd[t] * hd;
        const scalar_t* s = snd + pd[t] * hd;
        scalar_t* row = qd + t * qs0;
        for (int64_t h = 0; h < heads; ++h) rope_head(row + h * qs1, c, s, half);
        const int64_t slot = sd[t];
        if (slot < 0) continue;  // a padding token: rotated, not cached
        const int64_t blk = slot / block_size, off = slot % block_size;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          std::memcpy(kc + h * ks0 + blk * ks1 + off * ks2, row + (num_heads + h) * qs1, hd * sizeof(scalar_t));
          std::memcpy(vc + h * cs0 + blk * cs1 + off * cs2, vd + t * vs0 + h * vs1, hd * sizeof(scalar_t));
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// init_cpu_threads: size torch's OpenMP team to len(cpu_ids) and pin thread i to cpu_ids[i] (the library
// links the libgomp torch already loaded, so this parallel region is torch's team; at::parallel_for
// reuses the same threads afterwards). The calling thread is thread 0.

void init_cpu_threads(c10::IntArrayRef cpu_ids) {
  const int n = static_cast<int>(cpu_ids.size());
  DF_CHECK(n > 0, "init_cpu_threads: cpu_ids is empty");
  for (int64_t cpu : cpu_ids) {
    DF_CHECK(cpu >= 0 && cpu < CPU_SETSIZE, "init_cpu_threads: bad cpu id ", cpu);
  }
  DF_CHECK(!omp_in_parallel(), "init_cpu_threads: called inside a parallel region");
  at::set_num_threads(n);  // torch's count (and MKL's); also omp_set_num_threads(n)
  omp_set_num_threads(n);
  std::vector<int> errors(n, 0);
  std::vector<int> seen(n, 0);
  const std::vector<int64_t> ids(cpu_ids.begin(), cpu_ids.end());
#pragma omp parallel num_threads(n)
  {
    const int tid = omp_get_thread_num();
    if (tid < n) {
      seen[tid] = 1;
      cpu_set_t mask;
      CPU_ZERO(&mask);
      CPU_SET(static_cast<int>(ids[tid]), &mask);
      if (sched_setaffinity(0, sizeof(mask), &mask) != 0) errors[tid] = errno;
    }
  }
  for (int i = 0; i < n; ++i) {
    DF_CHECK(seen[i], "init_cpu_threads: OpenMP gave fewer than ", n, " threads");
    DF_CHECK(errors[i] == 0, "init_cpu_threads: pinning thread ", i, " to cpu ", ids[i],
             " failed: ", std::strerror(errors[i]));
  }
}

}  // namespace
}  // namespace deepflow

TORCH_LIBRARY_FRAGMENT(deepflow, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()", &deepflow::rms_norm);
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()",
        &deepflow::fused_add_rms_norm);
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()", &deepflow::silu_and_mul);
  m.def(
      "rope_and_cache(Tensor(a!) qk, Tensor v, Tensor cos, Tensor sin, Tensor positions, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor slot_mapping, int num_heads, int num_kv_heads) -> ()",
      &deepflow::rope_and_cache);
  m.def("init_cpu_threads(int[] cpu_ids) -> ()", &deepflow::init_cpu_threads);
}
