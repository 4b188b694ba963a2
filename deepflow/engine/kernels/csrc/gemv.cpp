// Small-batch bf16 GEMM (decode: 1-64 rows) over a weight repacked once at load for _mm512_dpbf16_ps.
//
// Packed layout (a 1-D bf16 tensor):
//   [0, 32)   a 64-byte header: magic, layout version, N, K, Kp = ceil(K/2), number of 16-column tiles
//   [32, ...) tiles of 16 output columns, each Kp * 32 bf16 = one 64-byte line per K pair:
//             tile[t][p][c][j] = w[16 t + c][2 p + j]   (zero past N and past K)
// so one column tile streams contiguously and each line is one dpbf16 operand (16 columns x a K pair).
// The op broadcasts the pair (x[m][2p], x[m][2p+1]) as one 32-bit value, accumulates in fp32 per (row,
// column), adds the bias in fp32 and rounds to bf16 once. Threads split the column tiles; every tile is
// used for all rows (up to 16 at a time) while it is in registers, so each weight byte is read once per
// call for M <= 16 (M > 16: passes of 8 rows x 3 tiles, the group re-read from L2 per pass). dpbf16 reads bf16 denormals
// as zero (and flushes denormal sums), which torch's fp32 matmul does not: the only other difference
// from the reference besides the order of the fp32 additions.
#include "gemv_util.h"

#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace deepflow {
namespace {

constexpr int32_t kMagic = 0x57504644;  // "DFPW"
constexpr int32_t kLayout = 1;
constexpr int64_t kHeaderElems = 32;  // 64 bytes of bf16 storage
constexpr int64_t kTileCols = 16;
constexpr int kMaxRows = 16;  // rows one pass over the weight serves
// Lines ahead of the one being read that each weight stream prefetches (software prefetch into L1).
#ifndef DF_GEMV_PREFETCH_LINES
#define DF_GEMV_PREFETCH_LINES 24
#endif
constexpr int64_t kPrefetchLines = DF_GEMV_PREFETCH_LINES;
#ifndef DF_GEMV_PASS_ROWS
#define DF_GEMV_PASS_ROWS 16
#endif

struct Header {
  int32_t magic, layout, n, k, kp, ntiles;
  int32_t reserved[10];
};
static_assert(sizeof(Header) == kHeaderElems * sizeof(c10::BFloat16), "header must be 64 bytes");

Header read_header(const at::Tensor& packed) {
  DF_CHECK(packed.dtype() == at::kBFloat16 && packed.dim() == 1 && packed.is_contiguous() && packed.is_cpu(),
           "small_linear: packed must be a contiguous 1-D bf16 CPU tensor from pack_linear_weight");
  DF_CHECK(packed.numel() >= kHeaderElems, "small_linear: packed weight too small for its header");
  Header h;
  std::memcpy(&h, packed.data_ptr(), sizeof(h));
  DF_CHECK(h.magic == kMagic && h.layout == kLayout,
           "small_linear: packed is not a weight from pack_linear_weight (or an older layout)");
  DF_CHECK(packed.numel() == kHeaderElems + int64_t(h.ntiles) * h.kp * 32,
           "small_linear: packed weight has ", packed.numel(), " elements, its header says ",
           kHeaderElems + int64_t(h.ntiles) * h.kp * 32);
  return h;
}

at::Tensor pack_linear_weight(const at::Tensor& w_in) {
  DF_CHECK(w_in.dim() == 2, "pack_linear_weight: weight must be [N, K], got ", w_in.sizes());
  DF_CHECK(w_in.is_cpu(), "pack_linear_weight: weight must be on the CPU");
  DF_CHECK(w_in.dtype() == at::kBFloat16, "pack_linear_weight: weight must be bfloat16, got ", w_in.dtype());
  const int64_t n = w_in.size(0), k = w_in.size(1);
  DF_CHECK(n > 0 && k > 0 && n < (int64_t(1) << 30) && k < (int64_t(1) << 30),
           "pack_linear_weight: bad weight shape ", w_in.sizes());
  const at::Tensor w = w_in.contiguous();
  const int64_t kp = (k + 1) / 2, ntiles = (n + kTileCols - 1) / kTileCols;
  at::Tensor packed = at::empty({kHeaderElems + ntiles * kp * 32}, w.options());
  Header h{};
  h.magic = kMagic;
  h.layout = kLayout;
  h.n = static_cast<int32_t>(n);
  h.k = static_cast<int32_t>(k);
  h.kp = static_cast<int32_t>(kp);
  h.ntiles = static_cast<int32_t>(ntiles);
  std::memcpy(packed.data_ptr(), &h, sizeof(h));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<c10::BFloat16>()) + kHeaderElems;
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint16_t* tile = dst + t * kp * 32;
      for (int64_t c = 0; c < kTileCols; ++c) {
        const int64_t row = t * kTileCols + c;
        const uint16_t* wrow = src + row * k;
        for (int64_t p = 0; p < kp; ++p) {
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t col = 2 * p + j;
            tile[p * 32 + c * 2 + j] = (row < n && col < k) ? wrow[col] : uint16_t(0);
          }
        }
      }
    }
  });
  return packed;
}

// M rows x T adjacent column tiles: M*T fp32 accumulators, one weight line per tile per K pair.
template <int M, int T>
void tile_kernel(const uint32_t* __restrict x, int64_t kp, const c10::BFloat16* __restrict w, int64_t tile_elems,
                 const float* __restrict bias, c10::BFloat16* __restrict out, int64_t ldo, int64_t col0, int64_t n) {
  __m512 acc[M][T];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[m][t] = _mm512_setzero_ps();
  }
  const c10::BFloat16* wt[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) wt[t] = w + t * tile_elems;
#pragma GCC unroll 2
  for (int64_t p = 0; p < kp; ++p) {
    __m512i wv[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      wv[t] = _mm512_loadu_si512(wt[t] + p * 32);
      _mm_prefetch(reinterpret_cast<const char*>(wt[t] + (p + kPrefetchLines) * 32), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(x[m * kp + p]));
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        acc[m][t] = _mm512_dpbf16_ps(acc[m][t], (__m512bh)wv[t], (__m512bh)xb);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    const int64_t col = col0 + t * kTileCols;
    const __m512 b = bias ? _mm512_loadu_ps(bias + col) : _mm512_setzero_ps();
    const __mmask16 mask = tail_mask(n - col);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const __m512 v = _mm512_add_ps(acc[m][t], b);
      if (mask == 0xFFFF) {
        store_bf16_rne(out + m * ldo + col, v);
      } else {
        store_bf16_rne_masked(out + m * ldo + col, v, mask);
      }
    }
  }
}

using KernelFn = void (*)(const uint32_t*, int64_t, const c10::BFloat16*, int64_t, const float*, c10::BFloat16*,
                          int64_t, int64_t, int64_t);

// Column tiles processed together for a given row count (registers: M*T accumulators + T weights + 1 <= 32).
constexpr int tiles_for_rows(int m) { return m <= 4 ? 4 : m <= 8 ? 3 : m <= 12 ? 2 : 1; }

template <int M, int T>
constexpr KernelFn kernel_at() {
  return &tile_kernel<M, T>;
}

template <int M>
constexpr std::array<KernelFn, 5> kernels_for_rows() {
  return {nullptr, kernel_at<M, 1>(), kernel_at<M, 2>(), kernel_at<M, 3>(), kernel_at<M, 4>()};
}

template <int... Ms>
constexpr std::array<std::array<KernelFn, 5>, sizeof...(Ms) + 1> kernel_table(std::integer_sequence<int, Ms...>) {
  return {std::array<KernelFn, 5>{}, kernels_for_rows<Ms + 1>()...};
}

// kKernels[m][t]: m rows (1..16) x t column tiles (1..4).
const auto kKernels = kernel_table(std::make_integer_sequence<int, kMaxRows>{});

at::Tensor small_linear(const at::Tensor& x_in, const at::Tensor& packed, const std::optional<at::Tensor>& bias_in,
                        int64_t out_features) {
  const Header h = read_header(packed);
  DF_CHECK(out_features == h.n, "small_linear: out_features ", out_features, " but the packed weight has N = ", h.n);
  DF_CHECK(x_in.dtype() == at::kBFloat16 && x_in.is_cpu(), "small_linear: x must be a bf16 CPU tensor, got ",
           x_in.dtype());
  DF_CHECK(x_in.dim() >= 1 && x_in.size(-1) == h.k, "small_linear: x has K = ", x_in.size(-1),
           ", the packed weight has K = ", h.k);
  const int64_t n = h.n, k = h.k, kp = h.kp, ntiles = h.ntiles;
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();
  const int64_t rows = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_in.options());
  if (rows == 0) return out;

  // x as K pairs (one uint32 per pair, zero-padded when K is odd): the broadcast operand of dpbf16.
  std::vector<uint32_t> xp(static_cast<size_t>(rows * kp), 0u);
  const c10::BFloat16* xd = x.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < rows; ++m) std::memcpy(xp.data() + m * kp, xd + m * k, k * sizeof(c10::BFloat16));

  std::vector<float> bias;
  if (bias_in.has_value() && bias_in->defined()) {
    const at::Tensor& b = *bias_in;
    DF_CHECK(b.dim() == 1 && b.size(0) == n, "small_linear: bias must be [", n, "], got ", b.sizes());
    DF_CHECK(b.dtype() == at::kBFloat16 || b.dtype() == at::kFloat, "small_linear: bias must be bf16 or fp32");
    const at::Tensor b32 = b.to(at::kFloat).contiguous();
    bias.assign(static_cast<size_t>(ntiles * kTileCols), 0.0f);
    std::memcpy(bias.data(), b32.data_ptr<float>(), n * sizeof(float));
  }
  const float* bias_ptr = bias.empty() ? nullptr : bias.data();
  const c10::BFloat16* wbase = packed.data_ptr<c10::BFloat16>() + kHeaderElems;
  c10::BFloat16* od = out.data_ptr<c10::BFloat16>();
  const int64_t tile_elems = kp * 32;
  const uint32_t* xpd = xp.data();
  // Both cores take half the tiles unless the whole weight is a few tiles (then one thread: less than the
  // cost of waking the other).
  const int64_t tile_bytes = tile_elems * 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / tile_bytes);
  // Rows per pass over a tile group. Up to kPassRows the whole call is one pass (each weight byte read once
  // from memory); above it, passes of kPassRows rows x 3 tiles (24 accumulators: 11 loads per 24 dpbf16,
  // where 16 rows x 1 tile issue 17 loads per 16) re-read the group from L2, which is cheaper than the loads.
  const int64_t pass_rows = rows <= DF_GEMV_PASS_ROWS ? rows : 8;
  const int tmax = tiles_for_rows(static_cast<int>(pass_rows));
  at::parallel_for(0, ntiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tmax) {
      const int nt = static_cast<int>(std::min<int64_t>(tmax, end - t0));
      for (int64_t row0 = 0; row0 < rows; row0 += pass_rows) {
        const int mrows = static_cast<int>(std::min<int64_t>(pass_rows, rows - row0));
        kKernels[mrows][nt](xpd + row0 * kp, kp, wbase + t0 * tile_elems, tile_elems, bias_ptr, od + row0 * n, n,
                            t0 * kTileCols, n);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace deepflow

TORCH_LIBRARY_FRAGMENT(deepflow, m) {
  m.def("pack_linear_weight(Tensor w) -> Tensor", &deepflow::pack_linear_weight);
  m.def("small_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &deepflow::small_linear);
}
