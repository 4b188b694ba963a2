// Helpers for the paged attention kernels (csrc/attention.cpp): a vector exp, the 16x16 transpose-sum that
// turns 16 per-key partial dot products into one vector of 16 scores, bf16 pair packing.
#pragma once

#include "common.h"

#include <cstdint>
#include <limits>

namespace deepflow {
namespace attn {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) on 16 fp32 lanes: Cephes range reduction (x = n ln2 + r, |r| <= ln2/2), degree-6 polynomial,
// scale by 2^n with vscalefps. Max relative error ~2e-7 (about 2 ulp). Lanes below -103.9 (where the
// true value is under the smallest denormal) and -inf give exactly 0, so masked scores contribute nothing.
static inline __m512 exp512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.9f), _CMP_GE_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n));
}

// v[0..15] -> one vector whose lane j is the sum of v[j]'s 16 lanes (45 shuffles/adds instead of 16 full
// horizontal reductions).
static inline __m512 transpose_sum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // b[i]: 128-bit lane L holds keys 4i..4i+3 summed over the 4 elements of lane L.
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Word indices that interleave two vectors of 32 bf16: lo -> (a0,b0,a1,b1..a15,b15), hi -> (a16,b16..).
static inline __m512i interleave_lo_idx() {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = static_cast<int16_t>(i);
    idx[2 * i + 1] = static_cast<int16_t>(32 + i);
  }
  return _mm512_load_si512(idx);
}
static inline __m512i interleave_hi_idx() {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = static_cast<int16_t>(16 + i);
    idx[2 * i + 1] = static_cast<int16_t>(48 + i);
  }
  return _mm512_load_si512(idx);
}
// Within one vector: words (x0..x15, y0..y15) -> (x0,y0,x1,y1,..).
static inline __m512i pair_words_idx() {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = static_cast<int16_t>(i);
    idx[2 * i + 1] = static_cast<int16_t>(16 + i);
  }
  return _mm512_load_si512(idx);
}

// p0, p1 (fp32, 16 lanes each) -> 16 lanes of bf16 pairs (lo = p0, hi = p1), round to nearest even.
static inline __m512i pack_bf16_pairs(__m512 p0, __m512 p1, __m512i pair_idx) {
  const __m512bh t = _mm512_cvtne2ps_pbh(p1, p0);  // words 0-15 = p0, 16-31 = p1
  return _mm512_permutexvar_epi16(pair_idx, (__m512i)t);
}

static inline __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

static inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

}  // namespace attn
}  // namespace deepflow
