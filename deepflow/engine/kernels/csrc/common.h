// Shared helpers for the deepflow CPU kernels: bf16 <-> fp32 with AVX-512, checks, the parallel loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

namespace deepflow {

// 16 bf16 values -> 16 fp32 (exact: a bf16 is the top half of an fp32).
static inline __m512 load_bf16_as_fp32(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline __m512 load_bf16_as_fp32_masked(const c10::BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 fp32 -> 16 bf16, round to nearest even (what torch's .to(bfloat16) does).
static inline void store_fp32_as_bf16(c10::BFloat16* p, __m512 v) {
  __m256bh packed = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(packed));
}

static inline void store_fp32_as_bf16_masked(c10::BFloat16* p, __m512 v, __mmask16 m) {
  __m256bh packed = _mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i&>(packed));
}

static inline __m512 load_fp32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_as_fp32(const c10::BFloat16* p) { return load_bf16_as_fp32(p); }
static inline __m512 load_as_fp32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_as_fp32_masked(const c10::BFloat16* p, __mmask16 m) {
  return load_bf16_as_fp32_masked(p, m);
}
static inline __m512 load_as_fp32_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store_from_fp32(c10::BFloat16* p, __m512 v) { store_fp32_as_bf16(p, v); }
static inline void store_from_fp32(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store_from_fp32_masked(c10::BFloat16* p, __m512 v, __mmask16 m) {
  store_fp32_as_bf16_masked(p, v, m);
}
static inline void store_from_fp32_masked(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

#define DF_CHECK(cond, ...) TORCH_CHECK(cond, "deepflow kernel: ", __VA_ARGS__)

// Dispatch over the two dtypes the engine runs in.
#define DF_DISPATCH_FLOAT_BF16(dtype, NAME, ...)                                  \
  [&] {                                                                           \
    if ((dtype) == at::kBFloat16) {                                               \
      using scalar_t = c10::BFloat16;                                             \
      return __VA_ARGS__();                                                       \
    } else if ((dtype) == at::kFloat) {                                           \
      using scalar_t = float;                                                     \
      return __VA_ARGS__();                                                       \
    }                                                                             \
    TORCH_CHECK(false, NAME, ": unsupported dtype ", (dtype), " (float32, bfloat16)"); \
  }()

}  // namespace deepflow
