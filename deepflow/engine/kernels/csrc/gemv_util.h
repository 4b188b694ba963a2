// Helpers shared by gemv.cpp and fused.cpp on top of common.h: bf16 rounding exactly as torch's vectorized
// code does it, and torch's own vector exp (Sleef, exported by libtorch_cpu) so results match torch bit for bit.
#pragma once

#include "common.h"

extern "C" {
// The exp torch's Vectorized<float>::exp() calls on AVX-512 (1.0-ULP Sleef; libtorch_cpu exports it).
__m512 Sleef_expf16_u10(__m512);
}

namespace deepflow {

// fp32 -> bf16 round-to-nearest-even in integer arithmetic, as ATen's cvtfp32_bf16 does: unlike
// VCVTNEPS2BF16 it keeps fp32 denormals (the instruction flushes them to zero); NaN becomes 0xffff.
static inline __m256i fp32_to_bf16_rne(__m512 src) {
  __m512i value = _mm512_castps_si512(src);
  __mmask16 ordered = _mm512_cmp_ps_mask(src, src, _CMP_ORD_Q);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(value, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)), value);
  rounded = _mm512_srli_epi32(rounded, 16);
  rounded = _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0xffff), rounded);
  return _mm512_cvtepi32_epi16(rounded);
}

static inline void store_bf16_rne(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), fp32_to_bf16_rne(v));
}

static inline void store_bf16_rne_masked(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, fp32_to_bf16_rne(v));
}

// Round fp32 lanes to bf16 and back (the value a bf16 tensor would hold), torch's rounding.
static inline __m512 round_through_bf16(__m512 v) {
  __m512i bits = _mm512_cvtepu16_epi32(fp32_to_bf16_rne(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// Store an fp32 vector into scalar_t with torch's rounding (bf16) or as is (fp32).
static inline void store_torch(c10::BFloat16* p, __m512 v) { store_bf16_rne(p, v); }
static inline void store_torch(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store_torch_masked(c10::BFloat16* p, __m512 v, __mmask16 m) { store_bf16_rne_masked(p, v, m); }
static inline void store_torch_masked(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// What a value of the dtype holds after rounding (identity for fp32).
template <typename scalar_t>
static inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return round_through_bf16(v);
  } else {
    return v;
  }
}

}  // namespace deepflow
