// Paged attention reading K/V in place through each sequence's block table (nothing is gathered into a
// dense copy): one varlen op for decodes, prefills, prefill chunks, mixed batches and cascade parts.
// Caches are [KV heads, blocks, block size, head dim] (head-major); any block size >= 1.
//
// Two kernels, picked per sequence:
//  * decode (one query): work item = (sequence, KV head, key range). The query heads of the GQA group share
//    every K/V row load. Scores of 16 keys come from 16 partial dot products (bf16: vdpbf16ps on the raw
//    bf16 rows; fp32: FMA) folded by a 16x16 transpose-sum; online softmax per 16 keys; P.V in fp32 FMA on
//    converted V rows. Long contexts are split across threads (split-K, merged by log-sum-exp) when there
//    are too few items to keep every thread busy.
//  * many queries (prefill, chunked prefill, the non-causal shared-prefix part of a cascade): flash style.
//    Tile = up to 48 (query, head) rows of one KV head, laid out across vector lanes, so the softmax is
//    vertical (no horizontal reductions) and K/V rows are read in place with broadcasts. Per 32-key chunk:
//    S = Q.K^T (bf16: vdpbf16ps on bf16 pairs of head dims; fp32: FMA), causal mask only on chunks that
//    cross the diagonal (chunks above it are never visited), online softmax, O += P.V (bf16: vdpbf16ps on
//    P and V in bf16 pairs of keys, fp32 accumulation; fp32: FMA).
// All accumulation is fp32; exp is a vector polynomial in fp32. Work items are sorted by cost and pulled
// from a shared counter by torch's own OpenMP team (at::parallel_for), so mixed batches balance.
#include "attention_util.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

// Decode scores for bf16: vdpbf16ps on bf16 rows (default) or FMA on rows converted to fp32. Measured
// (SmolLM2 shapes, 1 thread): vdpbf16ps 10-12% faster (batch 32 x 320 keys from L3 0.37 vs 0.41 ms, batch 1
// x 1100 keys 0.038 vs 0.044 ms). P.V on vdpbf16ps (P rounded to bf16) was no faster than fp32 FMA, so P.V
// stays fp32.
#ifndef DF_ATTN_DECODE_QK_FMA
#define DF_ATTN_DECODE_QK_FMA 0
#endif
#ifndef DF_ATTN_PREFETCH
#define DF_ATTN_PREFETCH 1
#endif
// Decode: K/V rows are prefetched into L1 this many 16-key chunks ahead, and into L2 that many (0: none).
// Measured on batch 32 decodes streaming from DRAM (1 thread): no prefetch 6 GB/s, L1 1 ahead 10.5,
// L1 2 ahead the same, L1 4 ahead worse; L1 1 + L2 6 ahead 10.5-12.
#ifndef DF_ATTN_PREFETCH_CHUNKS
#define DF_ATTN_PREFETCH_CHUNKS 1
#endif
#ifndef DF_ATTN_PREFETCH_L2_CHUNKS
#define DF_ATTN_PREFETCH_L2_CHUNKS 6
#endif

namespace deepflow {
namespace {

using namespace attn;
typedef uint32_t __attribute__((may_alias)) u32a;

constexpr int kTileRows = 48;   // (query, head) rows per many-query tile: 3 vectors of 16 lanes
constexpr int kChunk = 32;      // keys per online-softmax step of the many-query kernel
constexpr int kMaxGroup = 8;    // query heads per decode item (larger groups are split in sub-groups)
constexpr int kMaxHeadDim = 256;

struct Ctx {
  const void* q;
  void* out;
  float* lse;
  const void* k;
  const void* v;
  const int32_t* bt;
  const int32_t* sl;
  const int32_t* qsl;
  int64_t H, KVH, G, hd, BS, W, head_stride;
  float scale;
  bool causal;
};

// Element offsets (within one KV head's cache) of consecutive key positions of one sequence.
struct KeyWalker {
  const int32_t* table;
  int64_t bs, block_elems, hd, blk, slot;
  KeyWalker(const int32_t* t, int64_t bs_, int64_t hd_, int64_t pos)
      : table(t), bs(bs_), block_elems(bs_ * hd_), hd(hd_), blk(pos / bs_), slot(pos % bs_) {}
  int64_t next() {
    const int64_t off = static_cast<int64_t>(table[blk]) * block_elems + slot * hd;
    if (++slot == bs) {
      slot = 0;
      ++blk;
    }
    return off;
  }
  // Fill `count` offsets, padding up to `cap` with the first one (a valid row; its result is masked).
  void fill(int64_t* off, int count, int cap) {
    for (int j = 0; j < count; ++j) off[j] = next();
    for (int j = count; j < cap; ++j) off[j] = off[0];
  }
};

template <typename T>
inline void prefetch_rows(const T* kb, const T* vb, const int64_t* off, int count, int64_t row_bytes) {
#if DF_ATTN_PREFETCH
  for (int j = 0; j < count; ++j) {
    const char* kr = reinterpret_cast<const char*>(kb + off[j]);
    const char* vr = reinterpret_cast<const char*>(vb + off[j]);
    for (int64_t b = 0; b < row_bytes; b += 64) {
      prefetch(kr + b);
      prefetch(vr + b);
    }
  }
#else
  (void)kb, (void)vb, (void)off, (void)count, (void)row_bytes;
#endif
}

// Per-thread scratch (allocated once per call and thread).
struct Scratch {
  float* qt;     // Q^T of a tile: [hd][48] fp32, or [hd/2][48] bf16 pairs
  float* st;     // scores / probabilities: [kChunk][48]
  uint32_t* pp;  // probabilities as bf16 pairs of keys: [kChunk/2][48]
  uint32_t* vp;  // V as bf16 pairs of keys: [kChunk/2][hd]
  float* ot;     // O^T accumulator: [hd][48]
  float* acc;    // decode accumulator: [kMaxGroup][hd]
  alignas(64) float m[kTileRows];
  alignas(64) float l[kTileRows];
  alignas(64) float alpha[kTileRows];
  float* base = nullptr;
  explicit Scratch(int64_t hd) {
    const size_t floats = hd * kTileRows + kChunk * kTileRows + kChunk / 2 * kTileRows + kChunk / 2 * hd +
                          hd * kTileRows + kMaxGroup * hd + 16 * 6;
    base = static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64));
    TORCH_CHECK(base != nullptr, "deepflow kernel: paged_attention scratch allocation failed");
    auto carve = [&, p = base](size_t n) mutable {
      float* r = p;
      p += (n + 15) / 16 * 16;
      return r;
    };
    qt = carve(hd * kTileRows);
    st = carve(kChunk * kTileRows);
    pp = reinterpret_cast<uint32_t*>(carve(kChunk / 2 * kTileRows));
    vp = reinterpret_cast<uint32_t*>(carve(kChunk / 2 * hd));
    ot = carve(hd * kTileRows);
    acc = carve(kMaxGroup * hd);
  }
  ~Scratch() { std::free(base); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ------------------------------------------------------------------------------------------------------
// Decode: one query token t of sequence n, query heads h0..h0+NG-1 of KV head g's group, keys [k0, k1).
// Leaves the unnormalized accumulator acc[NG][HD], the running max m (of scaled scores) and sum l.

template <typename T, int HDV, int NG>
void decode_part(const Ctx& c, int64_t t, int64_t n, int64_t g, int64_t h0, int64_t k0, int64_t k1, float* acc,
                 float* m, float* l) {
  constexpr int HD = HDV * 16;
  constexpr bool BF = std::is_same_v<T, c10::BFloat16>;
  constexpr bool DP = BF && !DF_ATTN_DECODE_QK_FMA;
  constexpr int NQB = (HDV + 1) / 2;  // vectors of 32 bf16 per row
  constexpr int kBudget = 16;         // accumulator registers for P.V
  constexpr int CB0 = kBudget / NG >= 16 ? 16 : kBudget / NG >= 8 ? 8 : kBudget / NG >= 4 ? 4 : kBudget / NG >= 2 ? 2 : 1;
  constexpr int CB = CB0 < HDV ? CB0 : HDV;
  const T* qrows = static_cast<const T*>(c.q) + (t * c.H + g * c.G + h0) * HD;
  const T* kb = static_cast<const T*>(c.k) + g * c.head_stride;
  const T* vb = static_cast<const T*>(c.v) + g * c.head_stride;
  const __m512 vscale = _mm512_set1_ps(c.scale);
  const __m512 ninf = _mm512_set1_ps(kNegInf);

  alignas(64) float qf[DP ? 16 : NG * HD];
  if constexpr (!DP) {
    for (int r = 0; r < NG; ++r)
      for (int cc = 0; cc < HDV; ++cc) _mm512_store_ps(qf + r * HD + cc * 16, load_as_fp32(qrows + r * HD + cc * 16));
  }
  for (int i = 0; i < NG * HD; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
  for (int r = 0; r < NG; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  alignas(64) float pbuf[NG][16];
  float alpha[NG];
  int64_t off[16], poff[16];
  const int32_t* table = c.bt + n * c.W;
  KeyWalker walk(table, c.BS, HD, k0);
  constexpr int64_t kAhead = 16 * DF_ATTN_PREFETCH_CHUNKS;
  KeyWalker ahead(table, c.BS, HD, std::min(k1, k0 + kAhead));
  KeyWalker far(table, c.BS, HD, k0);
  if constexpr (DF_ATTN_PREFETCH_CHUNKS > 1) {  // the first chunks, before the loop gets ahead
    for (int64_t p = k0 + 16; p < std::min(k1, k0 + kAhead); p += 16) {
      KeyWalker w(table, c.BS, HD, p);
      const int cnt = static_cast<int>(std::min<int64_t>(16, k1 - p));
      w.fill(poff, cnt, 16);
      prefetch_rows(kb, vb, poff, cnt, HD * static_cast<int64_t>(sizeof(T)));
    }
  }

  for (int64_t p = k0; p < k1; p += 16) {
    const int nk = static_cast<int>(std::min<int64_t>(16, k1 - p));
    walk.fill(off, nk, 16);
    const int na = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, k1 - p - kAhead)));
    if (DF_ATTN_PREFETCH_CHUNKS > 0 && na > 0) {
      ahead.fill(poff, na, 16);
      prefetch_rows(kb, vb, poff, na, HD * static_cast<int64_t>(sizeof(T)));
    }
    if constexpr (DF_ATTN_PREFETCH_L2_CHUNKS > 0) {
      constexpr int64_t kFar = 16 * DF_ATTN_PREFETCH_L2_CHUNKS;
      const int nf = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, k1 - p - kFar)));
      if (nf > 0) {
        if (p == k0) far = KeyWalker(table, c.BS, HD, p + kFar);
        far.fill(poff, nf, 16);
        for (int j = 0; j < nf; ++j) {
          const char* kr = reinterpret_cast<const char*>(kb + poff[j]);
          const char* vr = reinterpret_cast<const char*>(vb + poff[j]);
          for (int64_t bb = 0; bb < HD * static_cast<int64_t>(sizeof(T)); bb += 64) {
            _mm_prefetch(kr + bb, _MM_HINT_T1);
            _mm_prefetch(vr + bb, _MM_HINT_T1);
          }
        }
      }
    }
    const __mmask16 valid = tail_mask(nk);
    // Scores: row r, 16 keys.
    for (int r = 0; r < NG; ++r) {
      __m512 part[16];
      if constexpr (DP) {
        __m512i qv[NQB];
        const T* qr = qrows + r * HD;
        for (int cc = 0; cc < NQB; ++cc)
          qv[cc] = (HDV % 2 == 1 && cc == NQB - 1) ? _mm512_maskz_loadu_epi16(0xFFFF, qr + 32 * cc)
                                                   : _mm512_loadu_si512(qr + 32 * cc);
        for (int j = 0; j < 16; ++j) {
          const T* kr = kb + off[j];
          __m512 a = _mm512_setzero_ps();
          for (int cc = 0; cc < NQB; ++cc) {
            const __m512i kv = (HDV % 2 == 1 && cc == NQB - 1) ? _mm512_maskz_loadu_epi16(0xFFFF, kr + 32 * cc)
                                                               : _mm512_loadu_si512(kr + 32 * cc);
            a = dpbf16(a, qv[cc], kv);
          }
          part[j] = a;
        }
      } else {
        const float* qr = qf + r * HD;
        for (int j = 0; j < 16; ++j) {
          const T* kr = kb + off[j];
          __m512 a = _mm512_mul_ps(_mm512_load_ps(qr), load_as_fp32(kr));
          for (int cc = 1; cc < HDV; ++cc) a = _mm512_fmadd_ps(_mm512_load_ps(qr + cc * 16), load_as_fp32(kr + cc * 16), a);
          part[j] = a;
        }
      }
      __m512 s = _mm512_mul_ps(transpose_sum16(part), vscale);
      s = _mm512_mask_blend_ps(valid, ninf, s);
      const float mx = _mm512_reduce_max_ps(s);
      const float mn = std::max(m[r], mx);
      if (mn == kNegInf) {  // only if scores are -inf themselves
        alpha[r] = 1.0f;
        _mm512_store_ps(pbuf[r], _mm512_setzero_ps());
        continue;
      }
      alpha[r] = m[r] == kNegInf ? 0.0f : std::exp(m[r] - mn);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s, _mm512_set1_ps(mn))));
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(e);
      m[r] = mn;
      _mm512_store_ps(pbuf[r], e);
    }
    // Output: acc = acc * alpha + P.V, each V row loaded once per CB-vector slice for all NG heads.
    for (int c0 = 0; c0 < HDV; c0 += CB) {
      __m512 o[NG][CB];
      for (int r = 0; r < NG; ++r) {
        const __m512 al = _mm512_set1_ps(alpha[r]);
        for (int cc = 0; cc < CB; ++cc) o[r][cc] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * HD + (c0 + cc) * 16), al);
      }
      for (int j = 0; j < nk; ++j) {
        const T* vr = vb + off[j] + c0 * 16;
        __m512 vv[CB];
        for (int cc = 0; cc < CB; ++cc) vv[cc] = load_as_fp32(vr + cc * 16);
        for (int r = 0; r < NG; ++r) {
          const __m512 pr = _mm512_set1_ps(pbuf[r][j]);
          for (int cc = 0; cc < CB; ++cc) o[r][cc] = _mm512_fmadd_ps(pr, vv[cc], o[r][cc]);
        }
      }
      for (int r = 0; r < NG; ++r)
        for (int cc = 0; cc < CB; ++cc) _mm512_storeu_ps(acc + r * HD + (c0 + cc) * 16, o[r][cc]);
    }
  }
}

using DecodeFn = void (*)(const Ctx&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);

template <typename T, int HDV>
DecodeFn decode_fn_for_group(int64_t ng) {
  switch (ng) {
    case 1: return &decode_part<T, HDV, 1>;
    case 2: return &decode_part<T, HDV, 2>;
    case 3: return &decode_part<T, HDV, 3>;
    case 4: return &decode_part<T, HDV, 4>;
    case 5: return &decode_part<T, HDV, 5>;
    case 6: return &decode_part<T, HDV, 6>;
    case 7: return &decode_part<T, HDV, 7>;
    case 8: return &decode_part<T, HDV, 8>;
    default: return nullptr;
  }
}

template <typename T>
DecodeFn decode_fn(int64_t hd, int64_t ng) {
  switch (hd) {
    case 16: return decode_fn_for_group<T, 1>(ng);
    case 32: return decode_fn_for_group<T, 2>(ng);
    case 64: return decode_fn_for_group<T, 4>(ng);
    case 128: return decode_fn_for_group<T, 8>(ng);
    case 256: return decode_fn_for_group<T, 16>(ng);
    default: return nullptr;
  }
}

// Normalize a (unnormalized acc, m, l) result into out rows t, heads h..h+ng-1, and lse.
template <typename T>
void write_rows(const Ctx& c, int64_t t, int64_t h, int64_t ng, const float* acc, const float* m, const float* l) {
  for (int64_t r = 0; r < ng; ++r) {
    T* row = static_cast<T*>(c.out) + (t * c.H + h + r) * c.hd;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    const __m512 vi = _mm512_set1_ps(inv);
    for (int64_t d = 0; d < c.hd; d += 16) store_from_fp32(row + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * c.hd + d), vi));
    if (c.lse) c.lse[t * c.H + h + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kNegInf;
  }
}


// ------------------------------------------------------------------------------------------------------
// Many-query micro-kernels. Kept out of line: inlined into the tile loop, GCC keeps their register-blocked
// accumulators in registers but also stores them to the stack on every iteration.

// S rows for KJ keys (offsets off[0..KJ)) x 16*RV lanes: st[j][lane] = scale * q_lane . k_j, -inf where the
// key is after the row's position (only when `masked`).
template <typename T, int RV, int KJ>
__attribute__((noinline)) void qk_block(const float* qt_, const T* kb, const int64_t* off, int64_t hd, float* st,
                                        float scale, const int32_t* rowpos, int64_t kpos0, bool masked) {
  constexpr int RW = RV * 16;
  __m512 acc[KJ][RV];
  for (int j = 0; j < KJ; ++j)
    for (int rv = 0; rv < RV; ++rv) acc[j][rv] = _mm512_setzero_ps();
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const u32a* qt = reinterpret_cast<const u32a*>(qt_);
    const u32a* kr[KJ];
    for (int j = 0; j < KJ; ++j) kr[j] = reinterpret_cast<const u32a*>(kb + off[j]);
    for (int64_t d2 = 0; d2 < hd / 2; ++d2) {
      __m512i qv[RV];
      for (int rv = 0; rv < RV; ++rv) qv[rv] = _mm512_load_si512(qt + d2 * RW + rv * 16);
      for (int j = 0; j < KJ; ++j) {
        const __m512i b = _mm512_set1_epi32(static_cast<int>(kr[j][d2]));
        for (int rv = 0; rv < RV; ++rv) acc[j][rv] = dpbf16(acc[j][rv], qv[rv], b);
      }
    }
  } else {
    const float* kr[KJ];
    for (int j = 0; j < KJ; ++j) kr[j] = reinterpret_cast<const float*>(kb + off[j]);
    for (int64_t d = 0; d < hd; ++d) {
      __m512 qv[RV];
      for (int rv = 0; rv < RV; ++rv) qv[rv] = _mm512_load_ps(qt_ + d * RW + rv * 16);
      for (int j = 0; j < KJ; ++j) {
        const __m512 b = _mm512_set1_ps(kr[j][d]);
        for (int rv = 0; rv < RV; ++rv) acc[j][rv] = _mm512_fmadd_ps(qv[rv], b, acc[j][rv]);
      }
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int j = 0; j < KJ; ++j) {
    const __m512i kpos = _mm512_set1_epi32(static_cast<int>(kpos0 + j));
    for (int rv = 0; rv < RV; ++rv) {
      __m512 v = _mm512_mul_ps(acc[j][rv], vscale);
      if (masked) v = _mm512_mask_mov_ps(v, _mm512_cmplt_epi32_mask(_mm512_load_si512(rowpos + rv * 16), kpos), ninf);
      _mm512_store_ps(st + j * RW + rv * 16, v);
    }
  }
}

// V rows of nk keys -> bf16 pairs of consecutive keys: vp[jp][d] = (V[2jp][d], V[2jp+1][d]), zero past nk.
__attribute__((noinline)) void pack_v_pairs(const c10::BFloat16* vb, const int64_t* off, int nk, int64_t hd,
                                            uint32_t* vp_) {
  const __m512i ilo = interleave_lo_idx(), ihi = interleave_hi_idx();
  for (int jp = 0; 2 * jp < nk; ++jp) {
    const c10::BFloat16* va = vb + off[2 * jp];
    const c10::BFloat16* vbb = 2 * jp + 1 < nk ? vb + off[2 * jp + 1] : nullptr;
    u32a* dst = reinterpret_cast<u32a*>(vp_ + jp * hd);
    int64_t d0 = 0;
    for (; d0 + 32 <= hd; d0 += 32) {
      const __m512i a = _mm512_loadu_si512(va + d0);
      const __m512i b = vbb ? _mm512_loadu_si512(vbb + d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d0, _mm512_permutex2var_epi16(a, ilo, b));
      _mm512_storeu_si512(dst + d0 + 16, _mm512_permutex2var_epi16(a, ihi, b));
    }
    if (d0 < hd) {  // 16 left
      const __m512i a = _mm512_maskz_loadu_epi16(0xFFFF, va + d0);
      const __m512i b = vbb ? _mm512_maskz_loadu_epi16(0xFFFF, vbb + d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d0, _mm512_permutex2var_epi16(a, ilo, b));
    }
  }
}

// O^T[d][lane] = O^T * alpha[lane] + sum over key pairs of P pair . V pair (bf16 pairs, fp32 accumulation).
template <int RV>
__attribute__((noinline)) void pv_bf16(float* ot, const float* alpha, const uint32_t* pp, const uint32_t* vp_,
                                       int njp, int64_t hd) {
  constexpr int RW = RV * 16, DC = 8;
  const u32a* vp = reinterpret_cast<const u32a*>(vp_);
  __m512 al[RV];
  for (int rv = 0; rv < RV; ++rv) al[rv] = _mm512_load_ps(alpha + rv * 16);
  for (int64_t d0 = 0; d0 < hd; d0 += DC) {
    __m512 o[DC][RV];
    for (int dd = 0; dd < DC; ++dd)
      for (int rv = 0; rv < RV; ++rv) o[dd][rv] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + dd) * RW + rv * 16), al[rv]);
    for (int jp = 0; jp < njp; ++jp) {
      __m512i pv[RV];
      for (int rv = 0; rv < RV; ++rv) pv[rv] = _mm512_load_si512(pp + jp * RW + rv * 16);
      const u32a* vr = vp + jp * hd + d0;
      for (int dd = 0; dd < DC; ++dd) {
        const __m512i b = _mm512_set1_epi32(static_cast<int>(vr[dd]));
        for (int rv = 0; rv < RV; ++rv) o[dd][rv] = dpbf16(o[dd][rv], pv[rv], b);
      }
    }
    for (int dd = 0; dd < DC; ++dd)
      for (int rv = 0; rv < RV; ++rv) _mm512_store_ps(ot + (d0 + dd) * RW + rv * 16, o[dd][rv]);
  }
}

// fp32: O^T[d][lane] = O^T * alpha[lane] + sum_j P[j][lane] * V[j][d], V read in place.
template <int RV>
__attribute__((noinline)) void pv_f32(float* ot, const float* alpha, const float* pt, const float* vb,
                                      const int64_t* off, int nk, int64_t hd) {
  constexpr int RW = RV * 16, DC = 8;
  __m512 al[RV];
  for (int rv = 0; rv < RV; ++rv) al[rv] = _mm512_load_ps(alpha + rv * 16);
  for (int64_t d0 = 0; d0 < hd; d0 += DC) {
    __m512 o[DC][RV];
    for (int dd = 0; dd < DC; ++dd)
      for (int rv = 0; rv < RV; ++rv) o[dd][rv] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + dd) * RW + rv * 16), al[rv]);
    for (int j = 0; j < nk; ++j) {
      __m512 pv[RV];
      for (int rv = 0; rv < RV; ++rv) pv[rv] = _mm512_load_ps(pt + j * RW + rv * 16);
      const float* vr = vb + off[j] + d0;
      for (int dd = 0; dd < DC; ++dd) {
        const __m512 b = _mm512_set1_ps(vr[dd]);
        for (int rv = 0; rv < RV; ++rv) o[dd][rv] = _mm512_fmadd_ps(pv[rv], b, o[dd][rv]);
      }
    }
    for (int dd = 0; dd < DC; ++dd)
      for (int rv = 0; rv < RV; ++rv) _mm512_store_ps(ot + (d0 + dd) * RW + rv * 16, o[dd][rv]);
  }
}

// ------------------------------------------------------------------------------------------------------
// Many queries: rows [r0, r1) of sequence n's (query, head-in-group) rows for KV head g, row r = qi*G + gi.

template <typename T, int RV>
void mq_tile(const Ctx& c, int64_t n, int64_t g, int64_t r0, int64_t r1, Scratch& s) {
  constexpr int RW = RV * 16;
  constexpr bool BF = std::is_same_v<T, c10::BFloat16>;
  constexpr int KJ = RV == 1 ? 16 : 8;  // keys per register block of S
  const int64_t hd = c.hd, G = c.G, H = c.H;
  const int64_t qs = c.qsl[n], qlen = c.qsl[n + 1] - qs, L = c.sl[n];
  const int R = static_cast<int>(r1 - r0);
  const int64_t pos0 = L - qlen;  // position of query 0 (causal)
  int64_t kend = L, nomask_end = L;
  if (c.causal) {
    kend = std::min<int64_t>(L, pos0 + (r1 - 1) / G + 1);
    nomask_end = pos0 + r0 / G + 1;  // keys below are visible to every row of the tile
  }
  kend = std::max<int64_t>(kend, 0);
  const T* qbase = static_cast<const T*>(c.q);
  const T* kb = static_cast<const T*>(c.k) + g * c.head_stride;
  const T* vb = static_cast<const T*>(c.v) + g * c.head_stride;
  const int64_t row_bytes = hd * static_cast<int64_t>(sizeof(T));

  alignas(64) int32_t rowpos[RW];
  for (int lane = 0; lane < RW; ++lane)
    rowpos[lane] = (c.causal && lane < R) ? static_cast<int32_t>(pos0 + (r0 + lane) / G)
                                          : std::numeric_limits<int32_t>::max();
  // Q^T: lane = row.
  if constexpr (BF) {
    u32a* qt = reinterpret_cast<u32a*>(s.qt);
    for (int lane = 0; lane < RW; ++lane) {
      if (lane < R) {
        const int64_t r = r0 + lane;
        const u32a* qr = reinterpret_cast<const u32a*>(qbase + ((qs + r / G) * H + g * G + r % G) * hd);
        for (int64_t d2 = 0; d2 < hd / 2; ++d2) qt[d2 * RW + lane] = qr[d2];
      } else {
        for (int64_t d2 = 0; d2 < hd / 2; ++d2) qt[d2 * RW + lane] = 0;
      }
    }
  } else {
    for (int lane = 0; lane < RW; ++lane) {
      if (lane < R) {
        const int64_t r = r0 + lane;
        const float* qr = reinterpret_cast<const float*>(qbase) + ((qs + r / G) * H + g * G + r % G) * hd;
        for (int64_t d = 0; d < hd; ++d) s.qt[d * RW + lane] = qr[d];
      } else {
        for (int64_t d = 0; d < hd; ++d) s.qt[d * RW + lane] = 0.0f;
      }
    }
  }
  for (int64_t i = 0; i < hd * RW; i += 16) _mm512_store_ps(s.ot + i, _mm512_setzero_ps());
  for (int rv = 0; rv < RV; ++rv) {
    _mm512_store_ps(s.m + rv * 16, _mm512_set1_ps(kNegInf));
    _mm512_store_ps(s.l + rv * 16, _mm512_setzero_ps());
  }
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const __m512i ipair = pair_words_idx();

  int64_t off_a[kChunk], off_b[kChunk];
  int64_t* off = off_a;
  int64_t* noff = off_b;
  KeyWalker walk(c.bt + n * c.W, c.BS, hd, 0);
  if (kend > 0) walk.fill(off, static_cast<int>(std::min<int64_t>(kChunk, kend)), kChunk);

  for (int64_t kc0 = 0; kc0 < kend; kc0 += kChunk) {
    const int nk = static_cast<int>(std::min<int64_t>(kChunk, kend - kc0));
    const int nn = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kChunk, kend - kc0 - kChunk)));
    if (nn > 0) {
      walk.fill(noff, nn, kChunk);
      prefetch_rows(kb, vb, noff, nn, row_bytes);
    }
    const bool masked = kc0 + nk > nomask_end;

    // S = Q.K^T (scaled, masked) -> st[key][lane]
    for (int jb = 0; jb * KJ < nk; ++jb)
      qk_block<T, RV, KJ>(s.qt, kb, off + jb * KJ, hd, s.st + jb * KJ * RW, c.scale, rowpos, kc0 + jb * KJ, masked);

    // Online softmax, vertical over keys (lane = row).
    __m512 alpha[RV];
    for (int rv = 0; rv < RV; ++rv) {
      const float* sc = s.st + rv * 16;
      __m512 cm = _mm512_load_ps(sc);
      for (int j = 1; j < nk; ++j) cm = _mm512_max_ps(cm, _mm512_load_ps(sc + j * RW));
      const __m512 mold = _mm512_load_ps(s.m + rv * 16);
      const __m512 mnew = _mm512_max_ps(mold, cm);
      const __m512 muse = _mm512_mask_mov_ps(mnew, _mm512_cmp_ps_mask(mnew, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
      alpha[rv] = exp512(_mm512_sub_ps(mold, muse));
      __m512 sum = _mm512_setzero_ps();
      if constexpr (BF) {
        for (int jp = 0; 2 * jp < nk; ++jp) {
          const __m512 p0 = exp512(_mm512_sub_ps(_mm512_load_ps(sc + 2 * jp * RW), muse));
          const __m512 p1 = 2 * jp + 1 < nk ? exp512(_mm512_sub_ps(_mm512_load_ps(sc + (2 * jp + 1) * RW), muse))
                                            : _mm512_setzero_ps();
          sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
          _mm512_store_si512(s.pp + jp * RW + rv * 16, pack_bf16_pairs(p0, p1, ipair));
        }
      } else {
        for (int j = 0; j < nk; ++j) {
          const __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(sc + j * RW), muse));
          sum = _mm512_add_ps(sum, p);
          _mm512_store_ps(s.st + j * RW + rv * 16, p);
        }
      }
      _mm512_store_ps(s.l + rv * 16, _mm512_fmadd_ps(_mm512_load_ps(s.l + rv * 16), alpha[rv], sum));
      _mm512_store_ps(s.m + rv * 16, mnew);
    }

    // O^T = O^T * alpha + P.V
    for (int rv = 0; rv < RV; ++rv) _mm512_store_ps(s.alpha + rv * 16, alpha[rv]);
    if constexpr (BF) {
      pack_v_pairs(vb, off, nk, hd, s.vp);
      pv_bf16<RV>(s.ot, s.alpha, s.pp, s.vp, (nk + 1) / 2, hd);
    } else {
      pv_f32<RV>(s.ot, s.alpha, s.st, reinterpret_cast<const float*>(vb), off, nk, hd);
    }
    std::swap(off, noff);
  }

  // out rows = O^T columns / l
  alignas(64) int32_t gi_idx[16];
  for (int i = 0; i < 16; ++i) gi_idx[i] = i * RW;
  const __m512i gidx = _mm512_load_si512(gi_idx);
  for (int lane = 0; lane < R; ++lane) {
    const int64_t r = r0 + lane;
    const int64_t t = qs + r / G, h = g * G + r % G;
    T* row = static_cast<T*>(c.out) + (t * H + h) * hd;
    const float ll = s.l[lane];
    const __m512 inv = _mm512_set1_ps(ll > 0.0f ? 1.0f / ll : 0.0f);
    for (int64_t d0 = 0; d0 < hd; d0 += 16)
      store_from_fp32(row + d0, _mm512_mul_ps(_mm512_i32gather_ps(gidx, s.ot + d0 * RW + lane, 4), inv));
    if (c.lse) c.lse[t * H + h] = ll > 0.0f ? s.m[lane] + std::log(ll) : kNegInf;
  }
}

// ------------------------------------------------------------------------------------------------------

struct Item {
  int32_t kind;  // 0 decode, 1 many-query tile
  int32_t width; // decode: heads in the sub-group; tile: vectors of rows (1..3)
  int64_t n, g, h0, a, b, slot;
  double cost;
};

struct Merge {
  int64_t t, h, ng, slot0, parts;
};

template <typename T>
void run_items(const Ctx& c, const std::vector<Item>& items, float* part_acc, float* part_ml) {
  const int64_t hd = c.hd;
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(items.size());
  auto work = [&](int64_t, int64_t) {
    Scratch s(hd);
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) break;
      const Item& it = items[i];
      if (it.kind == 0) {
        const int64_t t = c.qsl[it.n];
        DecodeFn fn = decode_fn<T>(hd, it.width);
        float ml[2 * kMaxGroup];
        if (it.slot >= 0) {
          fn(c, t, it.n, it.g, it.h0, it.a, it.b, part_acc + it.slot * kMaxGroup * hd, part_ml + it.slot * 2 * kMaxGroup,
             part_ml + it.slot * 2 * kMaxGroup + kMaxGroup);
        } else {
          fn(c, t, it.n, it.g, it.h0, it.a, it.b, s.acc, ml, ml + kMaxGroup);
          write_rows<T>(c, t, it.g * c.G + it.h0, it.width, s.acc, ml, ml + kMaxGroup);
        }
      } else if (it.width == 1) {
        mq_tile<T, 1>(c, it.n, it.g, it.a, it.b, s);
      } else if (it.width == 2) {
        mq_tile<T, 2>(c, it.n, it.g, it.a, it.b, s);
      } else {
        mq_tile<T, 3>(c, it.n, it.g, it.a, it.b, s);
      }
    }
  };
  const int64_t nt = at::get_num_threads();
  if (nt > 1 && count > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, std::min<int64_t>(nt, count), 1, work);
  } else {
    work(0, 1);
  }
}

template <typename T>
void merge_parts(const Ctx& c, const std::vector<Merge>& merges, const float* part_acc, const float* part_ml) {
  const int64_t hd = c.hd;
  std::vector<float> acc(kMaxGroup * hd);
  for (const Merge& mg : merges) {
    float m[kMaxGroup], l[kMaxGroup];
    for (int64_t r = 0; r < mg.ng; ++r) {
      float mx = kNegInf;
      for (int64_t p = 0; p < mg.parts; ++p) mx = std::max(mx, part_ml[(mg.slot0 + p) * 2 * kMaxGroup + r]);
      float sum = 0.0f;
      float* a = acc.data() + r * hd;
      for (int64_t d = 0; d < hd; ++d) a[d] = 0.0f;
      if (mx != kNegInf) {
        for (int64_t p = 0; p < mg.parts; ++p) {
          const float* ml = part_ml + (mg.slot0 + p) * 2 * kMaxGroup;
          if (ml[kMaxGroup + r] <= 0.0f) continue;
          const float w = std::exp(ml[r] - mx);
          sum += w * ml[kMaxGroup + r];
          const float* pa = part_acc + (mg.slot0 + p) * kMaxGroup * hd + r * hd;
          const __m512 vw = _mm512_set1_ps(w);
          for (int64_t d = 0; d < hd; d += 16)
            _mm512_storeu_ps(a + d, _mm512_fmadd_ps(vw, _mm512_loadu_ps(pa + d), _mm512_loadu_ps(a + d)));
        }
      }
      m[r] = mx;
      l[r] = sum;
    }
    write_rows<T>(c, mg.t, mg.h, mg.ng, acc.data(), m, l);
  }
}

void paged_attention(const at::Tensor& out, const std::optional<at::Tensor>& lse, const at::Tensor& q,
                     const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale, bool causal) {
  for (const at::Tensor* t : {&out, &q, &k_cache, &v_cache, &block_tables, &seq_lens, &query_start_loc})
    DF_CHECK(t->device().is_cpu() && t->is_contiguous(), "paged_attention: CPU contiguous tensors only");
  DF_CHECK(q.dim() == 3, "paged_attention: q must be [T, H, head_dim]");
  DF_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "paged_attention: out must match q");
  DF_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
           "paged_attention: k_cache/v_cache must be [KVH, blocks, block_size, head_dim] of one shape");
  DF_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
           "paged_attention: q and the caches must share a dtype");
  DF_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "paged_attention: float32 or bfloat16");
  DF_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
               query_start_loc.scalar_type() == at::kInt,
           "paged_attention: block_tables, seq_lens, query_start_loc must be int32");
  const int64_t T = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t KVH = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  DF_CHECK(k_cache.size(3) == hd, "paged_attention: cache head_dim ", k_cache.size(3), " != q head_dim ", hd);
  DF_CHECK(hd == 16 || hd == 32 || hd == 64 || hd == 128 || hd == 256, "paged_attention: head_dim ", hd,
           " not in {16, 32, 64, 128, 256}");
  DF_CHECK(KVH > 0 && H % KVH == 0, "paged_attention: ", H, " query heads is not a multiple of ", KVH, " KV heads");
  DF_CHECK(BS >= 1, "paged_attention: block size must be >= 1");
  DF_CHECK(block_tables.dim() == 2 && seq_lens.dim() == 1 && query_start_loc.dim() == 1,
           "paged_attention: block_tables [N, W], seq_lens [N], query_start_loc [N+1]");
  const int64_t N = seq_lens.size(0), W = block_tables.size(1);
  DF_CHECK(block_tables.size(0) == N && query_start_loc.size(0) == N + 1,
           "paged_attention: block_tables [N, W], seq_lens [N], query_start_loc [N+1] with one N");
  float* lse_ptr = nullptr;
  if (lse.has_value()) {
    DF_CHECK(lse->device().is_cpu() && lse->is_contiguous() && lse->scalar_type() == at::kFloat && lse->dim() == 2 &&
                 lse->size(0) == T && lse->size(1) == H,
             "paged_attention: lse must be contiguous float32 [T, H]");
    lse_ptr = lse->data_ptr<float>();
  }
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  DF_CHECK(qsl[0] == 0 && qsl[N] == T, "paged_attention: query_start_loc must run from 0 to T=", T);
  for (int64_t n = 0; n < N; ++n) {
    DF_CHECK(qsl[n + 1] >= qsl[n], "paged_attention: query_start_loc must be non-decreasing");
    DF_CHECK(sl[n] >= 0 && sl[n] <= W * BS, "paged_attention: seq_lens[", n, "]=", sl[n], " outside [0, ", W * BS, "]");
    const int64_t used = (sl[n] + BS - 1) / BS;
    for (int64_t b = 0; b < used; ++b)
      DF_CHECK(bt[n * W + b] >= 0 && bt[n * W + b] < NB, "paged_attention: block id ", bt[n * W + b], " outside [0, ",
               NB, ")");
  }
  if (T == 0) return;

  const int64_t G = H / KVH;
  Ctx c{q.data_ptr(), out.data_ptr(), lse_ptr, k_cache.data_ptr(), v_cache.data_ptr(), bt, sl, qsl,
        H, KVH, G, hd, BS, W, NB * BS * hd, static_cast<float>(scale), causal};

  // Work items. Decode sub-groups: G split into ceil(G/8) near-equal parts of at most 8 heads.
  const int64_t nsub = (G + kMaxGroup - 1) / kMaxGroup;
  std::vector<Item> items;
  int64_t n_decode = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t qlen = qsl[n + 1] - qsl[n], L = sl[n];
    if (qlen == 0) continue;
    if (L == 0) {  // nothing to attend to
      at::Tensor rows = out.narrow(0, qsl[n], qlen);
      rows.zero_();
      if (lse_ptr) std::fill(lse_ptr + qsl[n] * H, lse_ptr + qsl[n + 1] * H, kNegInf);
      continue;
    }
    if (qlen == 1) {
      for (int64_t g = 0; g < KVH; ++g)
        for (int64_t sgi = 0; sgi < nsub; ++sgi) {
          const int64_t h0 = sgi * G / nsub, h1 = (sgi + 1) * G / nsub;
          items.push_back({0, static_cast<int32_t>(h1 - h0), n, g, h0, 0, L, -1,
                           static_cast<double>(L) * (17.0 * (h1 - h0) + 8.0) * hd / 64.0});
          ++n_decode;
        }
    } else {
      const int64_t rows = qlen * G;
      const int64_t ntiles = (rows + kTileRows - 1) / kTileRows;
      const int64_t pos0 = L - qlen;
      for (int64_t g = 0; g < KVH; ++g)
        for (int64_t ti = 0; ti < ntiles; ++ti) {
          const int64_t r0 = ti * rows / ntiles, r1 = (ti + 1) * rows / ntiles;
          const int rv = static_cast<int>((r1 - r0 + 15) / 16);
          int64_t keys = causal ? std::clamp<int64_t>(pos0 + (r1 - 1) / G + 1, 0, L) : L;
          if (causal) keys = std::max<int64_t>(0, keys - (r1 - r0) / G / 2);  // the diagonal chunk is half full
          items.push_back({1, rv, n, g, 0, r0, r1, -1, static_cast<double>(keys) * rv * 80.0 * hd / 64.0 + 1000.0});
        }
    }
  }
  // Split-K for decodes when there are too few items to keep every thread busy.
  const int64_t nt = at::get_num_threads();
  std::vector<Merge> merges;
  int64_t slots = 0;
  if (n_decode > 0 && nt > 1 && static_cast<int64_t>(items.size()) < 4 * nt) {
    const int64_t want = (8 * nt + static_cast<int64_t>(items.size()) - 1) / static_cast<int64_t>(items.size());
    std::vector<Item> split;
    for (const Item& it : items) {
      const int64_t L = it.b;
      const int64_t parts_max = std::max<int64_t>(1, L / 64);
      int64_t parts = std::min(want, parts_max);
      if (it.kind != 0 || parts <= 1) {
        split.push_back(it);
        continue;
      }
      const int64_t span = ((L + parts - 1) / parts + 15) / 16 * 16;
      parts = (L + span - 1) / span;
      merges.push_back({qsl[it.n], it.g * G + it.h0, it.width, slots, parts});
      for (int64_t p = 0; p < parts; ++p) {
        Item s = it;
        s.a = p * span;
        s.b = std::min(L, (p + 1) * span);
        s.slot = slots++;
        s.cost = it.cost * static_cast<double>(s.b - s.a) / static_cast<double>(L);
        split.push_back(s);
      }
    }
    items.swap(split);
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::vector<float> part_acc(static_cast<size_t>(slots * kMaxGroup * hd));
  std::vector<float> part_ml(static_cast<size_t>(slots * 2 * kMaxGroup));

  DF_DISPATCH_FLOAT_BF16(q.scalar_type(), "paged_attention", [&] {
    run_items<scalar_t>(c, items, part_acc.data(), part_ml.data());
    merge_parts<scalar_t>(c, merges, part_acc.data(), part_ml.data());
  });
}

// out = (a * exp(lse_a - m) + b * exp(lse_b - m)) / (exp(lse_a - m) + exp(lse_b - m)), m = max(lse_a, lse_b);
// rows where both are -inf get 0. out may alias a or b.
void merge_attention_states(const at::Tensor& out, const at::Tensor& a, const at::Tensor& lse_a, const at::Tensor& b,
                            const at::Tensor& lse_b) {
  for (const at::Tensor* t : {&out, &a, &lse_a, &b, &lse_b})
    DF_CHECK(t->device().is_cpu() && t->is_contiguous(), "merge_attention_states: CPU contiguous tensors only");
  DF_CHECK(a.dim() == 3 && b.sizes() == a.sizes() && out.sizes() == a.sizes(),
           "merge_attention_states: out, a, b must be [T, H, head_dim] of one shape");
  DF_CHECK(b.scalar_type() == a.scalar_type() && out.scalar_type() == a.scalar_type(),
           "merge_attention_states: out, a, b must share a dtype");
  const int64_t T = a.size(0), H = a.size(1), hd = a.size(2);
  for (const at::Tensor* t : {&lse_a, &lse_b})
    DF_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == T && t->size(1) == H,
             "merge_attention_states: lse must be float32 [T, H]");
  const float* la = lse_a.data_ptr<float>();
  const float* lb = lse_b.data_ptr<float>();
  DF_DISPATCH_FLOAT_BF16(a.scalar_type(), "merge_attention_states", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T * H, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float x = la[r], y = lb[r];
        const float m = std::max(x, y);
        float wa = 0.0f, wb = 0.0f;
        if (m != kNegInf) {
          wa = std::exp(x - m);
          wb = std::exp(y - m);
          const float inv = 1.0f / (wa + wb);
          wa *= inv;
          wb *= inv;
        }
        const __m512 va = _mm512_set1_ps(wa), vb = _mm512_set1_ps(wb);
        for (int64_t d = 0; d < hd; d += 16) {
          const __mmask16 mk = tail_mask(hd - d);
          const __m512 xa = load_as_fp32_masked(ap + r * hd + d, mk);
          const __m512 xb = load_as_fp32_masked(bp + r * hd + d, mk);
          store_from_fp32_masked(op + r * hd + d, _mm512_fmadd_ps(va, xa, _mm512_mul_ps(vb, xb)), mk);
        }
      }
    });
  });
}

}  // namespace
}  // namespace deepflow

TORCH_LIBRARY_FRAGMENT(deepflow, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor(b!)? lse, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, bool causal) -> ()",
      &deepflow::paged_attention);
  m.def("merge_attention_states(Tensor(a!) out, Tensor a, Tensor lse_a, Tensor b, Tensor lse_b) -> ()",
        &deepflow::merge_attention_states);
}
