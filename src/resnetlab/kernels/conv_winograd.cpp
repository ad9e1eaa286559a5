// A 3x3, padding-1, stride-1 convolution of bf16 channels_last CPU tensors by Winograd's minimal
// filtering F(2x2, 3x3) (Lavin & Gray 2016): per 2x2 output tile, y = A^T [(G w G^T) . (B^T d B)] A,
// 16 multiplications per input-output channel pair where the direct form needs 36, i.e. 2.25x fewer
// multiply-adds. The transformed input (B^T d B) and weights (G w G^T) are rounded to bf16, the
// products summed in fp32, the result rounded once to bf16: about three times the direct kernel's
// error (tests/test_conv_winograd.py bounds it). With the weights transposed and flipped
// (`winograd_weights(w, transpose=true)`) the same loop gives the input gradient dx = conv(dy, w^T flipped).
//
// Why: the direct kernels (conv_fwd.cpp) run at the core's peak, so fewer multiply-adds was what was
// left. On two threads of the 2-core Zen 4 the ResNet layers took 1.14 / 1.00 / 0.90 ms at 16 / 32 / 64
// channels against 1.39 / 1.28 / 1.23 ms direct (docs/speed-notes.md); the transforms weigh most at 16.
//
// How: tiles are taken 16 at a time (all in one image). The input transform reads each tile's 4x4
// patch (zeros outside the image), 16 channels per vector in fp32, and stores the 16 transformed
// positions as bf16 into V[position][tile][channel], so that two neighbouring channels form the pair
// vdpbf16ps multiplies. For each block of 16 output channels and each position, 16 accumulators (one
// per tile) take one weight load and 16 broadcast-multiply-adds per input-channel pair; the 16 x 16
// sums go to M, and the output transform turns each tile's 16 positions into its 2x2 outputs. V and M
// (at most 32 + 16 KB) stay in L1/L2. Threads take disjoint blocks of tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kTiles = 16;  // 2x2 output tiles per block

inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

template <int CI, int CO>
void run_block(const uint16_t* x, int64_t H, int64_t W, int64_t tile0, const uint32_t* U, uint16_t* y,
               uint32_t* V, float* M) {
  const int64_t TW = W / 2;
  // Input transform, one group of 16 channels at a time. B^T d is taken column by column, and
  // neighbouring tiles of a row share two columns: each column is loaded and combined once.
  for (int c0 = 0; c0 < CI; c0 += 16) {
    __m512 e[4][4];  // e[column][r]: (B^T d) of the current tile's four columns
    for (int t = 0; t < kTiles; ++t) {
      const int64_t tile = tile0 + t, th = tile / TW, tw = tile % TW;
      const uint16_t* rows[4];  // nullptr: a row of the zero border
      for (int r = 0; r < 4; ++r) {
        const int64_t h = 2 * th - 1 + r;
        rows[r] = h >= 0 && h < H ? x + h * W * CI + c0 : nullptr;
      }
      const auto column = [&](int64_t w, __m512(&col)[4]) {
        __m512 d[4];
        for (int r = 0; r < 4; ++r)
          d[r] = rows[r] != nullptr && w >= 0 && w < W ? load16(rows[r] + w * CI) : _mm512_setzero_ps();
        col[0] = _mm512_sub_ps(d[0], d[2]);
        col[1] = _mm512_add_ps(d[1], d[2]);
        col[2] = _mm512_sub_ps(d[2], d[1]);
        col[3] = _mm512_sub_ps(d[1], d[3]);
      };
      if (t == 0 || tw == 0) {
        column(2 * tw - 1, e[0]);
        column(2 * tw, e[1]);
      } else {
        for (int r = 0; r < 4; ++r) {
          e[0][r] = e[2][r];
          e[1][r] = e[3][r];
        }
      }
      column(2 * tw + 1, e[2]);
      column(2 * tw + 2, e[3]);
      for (int r = 0; r < 4; ++r) {  // (B^T d) B, stored as bf16 at positions r * 4 + 0..3
        uint16_t* v = reinterpret_cast<uint16_t*>(V + ((r * 4) * kTiles + t) * (CI / 2)) + c0;
        const int64_t stride = kTiles * CI;  // uint16 between positions
        store16(v, _mm512_sub_ps(e[0][r], e[2][r]));
        store16(v + stride, _mm512_add_ps(e[1][r], e[2][r]));
        store16(v + 2 * stride, _mm512_sub_ps(e[2][r], e[1][r]));
        store16(v + 3 * stride, _mm512_sub_ps(e[1][r], e[3][r]));
      }
    }
  }
  for (int ob = 0; ob < CO / 16; ++ob) {
    for (int pos = 0; pos < 16; ++pos) {
      __m512 acc[kTiles];
      for (int t = 0; t < kTiles; ++t) acc[t] = _mm512_setzero_ps();
      const uint32_t* u = U + (pos * (CO / 16) + ob) * (CI / 2) * 16;
      const uint32_t* v = V + pos * kTiles * (CI / 2);
#pragma GCC unroll 4
      for (int k = 0; k < CI / 2; ++k) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(u + k * 16);
#pragma GCC unroll 16
        for (int t = 0; t < kTiles; ++t)
          acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(static_cast<int>(v[t * (CI / 2) + k])), wv);
      }
      for (int t = 0; t < kTiles; ++t) _mm512_storeu_ps(M + (pos * kTiles + t) * 16, acc[t]);
    }
    for (int t = 0; t < kTiles; ++t) {
      const int64_t tile = tile0 + t, th = tile / TW, tw = tile % TW;
      __m512 s0[4], s1[4];
      for (int c = 0; c < 4; ++c) {
        const __m512 m0 = _mm512_loadu_ps(M + ((0 * 4 + c) * kTiles + t) * 16);
        const __m512 m1 = _mm512_loadu_ps(M + ((1 * 4 + c) * kTiles + t) * 16);
        const __m512 m2 = _mm512_loadu_ps(M + ((2 * 4 + c) * kTiles + t) * 16);
        const __m512 m3 = _mm512_loadu_ps(M + ((3 * 4 + c) * kTiles + t) * 16);
        s0[c] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
        s1[c] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
      }
      uint16_t* out = y + ((2 * th) * W + 2 * tw) * CO + ob * 16;
      store16(out, _mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]));
      store16(out + CO, _mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]));
      store16(out + W * CO, _mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]));
      store16(out + W * CO + CO, _mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]));
    }
  }
}

template <int CI, int CO>
void run(const uint16_t* x, int64_t N, int64_t H, int64_t W, const uint32_t* U, uint16_t* y) {
  const int64_t tiles = (H / 2) * (W / 2), per_image = tiles / kTiles, blocks = N * per_image;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> V(16 * kTiles * CI / 2 + 16);
    std::vector<float> M(16 * kTiles * 16 + 16);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b / per_image, tile0 = (b % per_image) * kTiles;
      run_block<CI, CO>(x + n * H * W * CI, H, W, tile0, U, y + n * H * W * CO, V.data(), M.data());
    }
  });
}

}  // namespace

// w [co, ci, 3, 3] fp32 -> G w G^T packed as [16 positions][co/16][ci/2][16 lanes][2] bf16. With transpose,
// the weights of the input gradient: w'[i][o][kh][kw] = w[o][i][2 - kh][2 - kw].
torch::Tensor winograd_weights(const torch::Tensor& weight, bool transpose) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "3x3 weights expected");
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t wo = w.size(0), wi = w.size(1);
  const int64_t co = transpose ? wi : wo, ci = transpose ? wo : wi;
  TORCH_CHECK(co % 16 == 0 && ci % 2 == 0, "channel counts");
  const float* src = w.data_ptr<float>();
  // g[i][tap][o]: output channels innermost, so that 16 of them fill a vector
  std::vector<float> g(ci * 9 * co);
  for (int64_t o = 0; o < co; ++o)
    for (int64_t i = 0; i < ci; ++i)
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw)
          g[(i * 9 + kh * 3 + kw) * co + o] =
              transpose ? src[((i * wi + o) * 3 + 2 - kh) * 3 + 2 - kw] : src[((o * wi + i) * 3 + kh) * 3 + kw];
  auto packed = torch::empty({16, co / 16, ci / 2, 16, 2}, w.options().dtype(at::kBFloat16));
  auto* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  alignas(64) uint16_t order_index[32];  // (a[j], b[j]) pairs from a | b
  for (int j = 0; j < 16; ++j) {
    order_index[2 * j] = j;
    order_index[2 * j + 1] = 16 + j;
  }
  const __m512i order = _mm512_load_si512(order_index);
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t ob = 0; ob < co / 16; ++ob)
    for (int64_t ip = 0; ip < ci / 2; ++ip) {
      __m512 u[2][16];  // G g G^T of input channels 2 ip and 2 ip + 1, 16 output channels per vector
      for (int s = 0; s < 2; ++s) {
        const float* gi = g.data() + (2 * ip + s) * 9 * co + ob * 16;
        __m512 gg[4][3];  // G g; G's rows are (1, 0, 0), (1, 1, 1) / 2, (1, -1, 1) / 2, (0, 0, 1)
        for (int c = 0; c < 3; ++c) {
          const __m512 g0 = _mm512_loadu_ps(gi + c * co), g1 = _mm512_loadu_ps(gi + (3 + c) * co),
                       g2 = _mm512_loadu_ps(gi + (6 + c) * co);
          gg[0][c] = g0;
          gg[1][c] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(g0, g1), g2));
          gg[2][c] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(g0, g1), g2));
          gg[3][c] = g2;
        }
        for (int r = 0; r < 4; ++r) {  // (G g) G^T
          u[s][r * 4 + 0] = gg[r][0];
          u[s][r * 4 + 1] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(gg[r][0], gg[r][1]), gg[r][2]));
          u[s][r * 4 + 2] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(gg[r][0], gg[r][1]), gg[r][2]));
          u[s][r * 4 + 3] = gg[r][2];
        }
      }
      for (int pos = 0; pos < 16; ++pos) {
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(u[0][pos])),
                                                (__m256i)_mm512_cvtneps_pbh(u[1][pos]), 1);
        _mm512_storeu_si512(dst + ((pos * (co / 16) + ob) * (ci / 2) + ip) * 32, _mm512_permutexvar_epi16(order, both));
      }
    }
  return packed;
}

// x [N, ci, H, W] bf16 channels_last, U from winograd_weights; returns y [N, co, H, W] bf16 channels_last.
torch::Tensor winograd(const torch::Tensor& x, const torch::Tensor& U, int64_t co) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && U.scalar_type() == at::kBFloat16, "bf16 tensors expected");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "a channels_last tensor expected");
  const int64_t N = x.size(0), ci = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(U.dim() == 5 && U.size(0) == 16 && U.size(1) * 16 == co && U.size(2) * 2 == ci && U.is_contiguous(),
              "transformed weights do not match the input's channels");
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0 && (H / 2) * (W / 2) % kTiles == 0,
              "the map must have even sides and a multiple of 16 2x2 tiles");
  auto y = torch::empty({N, co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* up = reinterpret_cast<const uint32_t*>(U.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
#define CASE(A, B) if (ci == A && co == B) { run<A, B>(xp, N, H, W, up, yp); return y; }
  CASE(16, 16) CASE(16, 32) CASE(16, 64) CASE(32, 16) CASE(32, 32) CASE(32, 64) CASE(64, 16) CASE(64, 32) CASE(64, 64)
#undef CASE
  TORCH_CHECK(false, "channel counts ", ci, " -> ", co, " not compiled");
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("winograd_weights", &winograd_weights, "G w G^T of 3x3 weights, packed for winograd()");
  m.def("winograd", &winograd, "3x3, padding-1, stride-1 convolution by Winograd F(2x2, 3x3), bf16 channels_last");
}
