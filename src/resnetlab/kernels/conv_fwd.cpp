// A 3x3 convolution (padding 1, stride 1 or 2, no groups) of bf16 channels_last CPU tensors with
// fp32 accumulation and a bf16 result, as oneDNN computes it under autocast:
//   y[n][ho][wo][o] = sum over kh, kw, i of x[n][ho*s + kh - 1][wo*s + kw - 1][i] * w[o][i][kh][kw]
// With the weights transposed and flipped (transpose=true) the same loop gives the input gradient
// of a stride-1 convolution: dx = conv(dy, w^T flipped); input_grad_stride2 gives that of a stride-2
// one. The Python side (conv3x3.py) checks the shapes and falls back to the native operators otherwise.
//
// Why: on the 2-core Zen 4 (AVX-512 BF16, no AMX) oneDNN ran the CIFAR ResNets' 16-channel layers,
// the largest share of a ResNet-20 step, at about 357 GFLOP/s forward against a bf16 matmul peak of
// about 426 (benchmarks/RESULTS.md).
//
// How: in channels_last the channels of a pixel are contiguous, so two neighbouring input channels
// (i, i+1) already form the bf16 pair that vdpbf16ps multiplies and adds into one fp32 lane. Each
// lane of an accumulator is one output channel; the weights are packed once per call as
// [co/16][9 taps][ci/2][16 lanes][2]. Per image, the input is copied into a zero-bordered buffer
// (which stays in L2), then for each block of up to 16 output pixels of a row and each block of 16
// output channels the loop runs over the 9 taps and the input-channel pairs: one weight load and up
// to 16 broadcast-multiply-adds. Threads take disjoint images.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Shape {
  int64_t ci, h, w, co, ho, wo, stride;
};

alignas(64) const uint32_t kZeros[32] = {};  // the zero border: read in place of pixels outside the image

// One tap: acc[b][p] += weights of block b (16 output lanes x one input pair) . broadcast input pair of
// pixel p, over the CI2 input pairs. Pixel p's pairs start at row + p * STEP, except that the first and
// last pixels read from `first` and `last` (a row of zeros where their tap falls outside the image).
template <int P, int OB, int CI2, int STEP>
inline void multiply_add_tap(__m512 (&acc)[OB][P], const __m512i* wk, const uint32_t* row, const uint32_t* first,
                             const uint32_t* last) {
  constexpr int PER_BLOCK = 9 * CI2;
#pragma GCC unroll 32
  for (int ip = 0; ip < CI2; ++ip) {
    __m512bh wv[OB];
    for (int b = 0; b < OB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(wk + b * PER_BLOCK + ip);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const uint32_t pair = p == 0 ? first[ip] : p == P - 1 ? last[ip] : row[p * STEP + ip];
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int b = 0; b < OB; ++b) acc[b][p] = _mm512_dpbf16_ps(acc[b][p], wv[b], xv);
    }
  }
}

// acc as bf16 (round to nearest even, as oneDNN rounds) to P pixels PIXEL_STEP values apart.
template <int P, int OB>
inline void store_bf16(const __m512 (&acc)[OB][P], uint16_t* out, int64_t pixel_step) {
  for (int b = 0; b < OB; ++b)
    for (int p = 0; p < P; ++p)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * pixel_step + b * 16),
                          (__m256i)_mm512_cvtneps_pbh(acc[b][p]));
}

// P output pixels (wo0 .. wo0+P-1 of row ho) x OB blocks of 16 output channels; CI input channels,
// stride S (compile-time, so that every load below has a constant offset). Each broadcast input
// pair feeds OB multiply-adds. Taps above or below the image are skipped; a tap left of the first
// pixel or right of the last reads zeros instead (only the block's first and last pixels can).
template <int P, int OB, int CI, int S>
inline void pixel_block(const uint32_t* image, const __m512i* weights, const Shape& s, int64_t ho, int64_t wo0,
                        uint16_t* out) {
  constexpr int CI2 = CI / 2;
  __m512 acc[OB][P];
  for (int b = 0; b < OB; ++b)
    for (int p = 0; p < P; ++p) acc[b][p] = _mm512_setzero_ps();
  for (int k = 0; k < 9; ++k) {
    const int64_t ih = ho * S + k / 3 - 1, iw = wo0 * S + k % 3 - 1;
    if (ih < 0 || ih >= s.h) continue;
    const uint32_t* row = image + (ih * s.w + iw) * CI2;
    const bool left_out = iw < 0, right_out = iw + (P - 1) * S >= s.w;
    const uint32_t* first = left_out || (P == 1 && right_out) ? kZeros : row;
    const uint32_t* last = right_out ? kZeros : row + (P - 1) * S * CI2;
    multiply_add_tap<P, OB, CI2, S * CI2>(acc, weights + k * CI2, row, first, last);
  }
  store_bf16<P, OB>(acc, out, s.co);
}

// One row of output pixels for OB output-channel blocks starting at weights/out.
template <int OB, int CI, int S>
void convolve_row(const uint32_t* image, const __m512i* weights, const Shape& s, int64_t ho, uint16_t* out) {
  int64_t wo = 0;
  if (OB == 1)  // OB x 16 accumulators + OB weights + 1 input: within the 32 registers
    for (; wo + 16 <= s.wo; wo += 16) pixel_block<16, OB, CI, S>(image, weights, s, ho, wo, out + wo * s.co);
  for (; wo + 8 <= s.wo; wo += 8) pixel_block<8, OB, CI, S>(image, weights, s, ho, wo, out + wo * s.co);
  for (; wo + 4 <= s.wo; wo += 4) pixel_block<4, OB, CI, S>(image, weights, s, ho, wo, out + wo * s.co);
  for (; wo < s.wo; ++wo) pixel_block<1, OB, CI, S>(image, weights, s, ho, wo, out + wo * s.co);
}

// Rows of 16 or more pixels: blocks of 16 pixels x 16 channels. Narrower rows (the 8x8 maps): blocks
// of 8 pixels x 32 channels, so that each broadcast input pair still feeds 16 multiply-adds
// (measured on the Zen 4: 0.66 against 0.94 ms for a 32->64 stride-2 layer at batch 128).
template <int CI, int S>
void convolve_rows(const uint32_t* image, const __m512i* weights, const Shape& s, uint16_t* y) {
  const int64_t per_block = 9 * CI / 2;
  const bool pairs = s.wo < 16;
  for (int64_t ho = 0; ho < s.ho; ++ho) {
    uint16_t* out = y + ho * s.wo * s.co;
    int64_t ob = 0;
    if (pairs)
      for (; ob + 2 <= s.co / 16; ob += 2) convolve_row<2, CI, S>(image, weights + ob * per_block, s, ho, out + ob * 16);
    for (; ob < s.co / 16; ++ob) convolve_row<1, CI, S>(image, weights + ob * per_block, s, ho, out + ob * 16);
  }
}

template <int CI>
void convolve_rows(const uint32_t* image, const __m512i* weights, const Shape& s, uint16_t* y) {
  if (s.stride == 1)
    convolve_rows<CI, 1>(image, weights, s, y);
  else
    convolve_rows<CI, 2>(image, weights, s, y);
}

void convolve_image(const uint16_t* x, const __m512i* weights, const Shape& s, uint16_t* y) {
  const auto* image = reinterpret_cast<const uint32_t*>(x);
  switch (s.ci) {
    case 16: return convolve_rows<16>(image, weights, s, y);
    case 32: return convolve_rows<32>(image, weights, s, y);
    case 48: return convolve_rows<48>(image, weights, s, y);
    case 64: return convolve_rows<64>(image, weights, s, y);
  }
}

// w [Co, Ci, 3, 3] (any float dtype) packed as bf16 [co/16][9][ci/2][16][2]; with transpose, the
// packing of w^T with the taps flipped (the input gradient's weights: co and ci swap roles).
std::vector<__m512i> pack_weights(const torch::Tensor& weight, bool transpose) {
  const auto w = weight.to(at::kBFloat16).contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t wo = w.size(0), wi = w.size(1);
  const int64_t co = transpose ? wi : wo, ci = transpose ? wo : wi;
  std::vector<__m512i> packed(co / 16 * 9 * ci / 2);
  auto* dst = reinterpret_cast<uint16_t*>(packed.data());
  for (int64_t ob = 0; ob < co / 16; ++ob)
    for (int k = 0; k < 9; ++k)
      for (int64_t ip = 0; ip < ci / 2; ++ip)
        for (int j = 0; j < 16; ++j)
          for (int e = 0; e < 2; ++e) {
            const int64_t o = ob * 16 + j, i = 2 * ip + e;
            const int64_t from = transpose ? (i * wi + o) * 9 + (8 - k) : (o * wi + i) * 9 + k;
            dst[(((ob * 9 + k) * (ci / 2) + ip) * 16 + j) * 2 + e] = src[from];
          }
  return packed;
}

// The input gradient of a stride-2 convolution: dx[ih][iw] collects dy[ho][wo] * w[kh][kw] over the taps
// with ih = 2 ho + kh - 1 and iw = 2 wo + kw - 1. Even rows take kh = 1 (ho = ih / 2), odd rows kh = 0
// (ho = ih / 2 + 1) and kh = 2 (ho = ih / 2); the same for columns. So each of the four parity classes of dx
// pixels is a small stride-1 convolution of dy (1, 2, 2 or 4 taps) whose output pixels lie 2 apart.
struct Stride2Shape {
  int64_t h, w, ci, ho, wo, co;  // dx [h][w][ci], dy [ho][wo][co]
};

struct Tap {
  int64_t dh, dw;  // dy row and column offsets from (ih / 2, j)
  int k;           // the tap kh * 3 + kw of w
};

// P dx pixels (ih, 2 j + parity for j = j0 .. j0+P-1) x OB blocks of 16 dx channels; CR dy channels.
// weights: w packed transposed (pack_weights(w, true)), whose tap t is w's tap 8 - t.
template <int P, int OB, int CR>
inline void stride2_block(const uint32_t* dy, const __m512i* weights, const Stride2Shape& s, int64_t a, int64_t j0,
                          const Tap* taps, int tap_count, uint16_t* out) {
  constexpr int CR2 = CR / 2;
  __m512 acc[OB][P];
  for (int b = 0; b < OB; ++b)
    for (int p = 0; p < P; ++p) acc[b][p] = _mm512_setzero_ps();
  for (int t = 0; t < tap_count; ++t) {
    const int64_t r = a + taps[t].dh, c = j0 + taps[t].dw;
    if (r >= s.ho) continue;
    const uint32_t* row = dy + (r * s.wo + c) * CR2;
    const bool right_out = c + P - 1 >= s.wo;
    const uint32_t* first = P == 1 && right_out ? kZeros : row;
    const uint32_t* last = right_out ? kZeros : row + (P - 1) * CR2;
    multiply_add_tap<P, OB, CR2, CR2>(acc, weights + (8 - taps[t].k) * CR2, row, first, last);
  }
  store_bf16<P, OB>(acc, out, 2 * s.ci);
}

template <int OB, int CR>
void stride2_row(const uint32_t* dy, const __m512i* weights, const Stride2Shape& s, int64_t ih, int parity,
                 const Tap* taps, int tap_count, uint16_t* out) {
  const int64_t count = (s.w - parity + 1) / 2;  // dx columns 2 j + parity
  int64_t j = 0;
  if (OB == 1)
    for (; j + 16 <= count; j += 16) stride2_block<16, OB, CR>(dy, weights, s, ih / 2, j, taps, tap_count, out + 2 * j * s.ci);
  for (; j + 8 <= count; j += 8) stride2_block<8, OB, CR>(dy, weights, s, ih / 2, j, taps, tap_count, out + 2 * j * s.ci);
  for (; j + 4 <= count; j += 4) stride2_block<4, OB, CR>(dy, weights, s, ih / 2, j, taps, tap_count, out + 2 * j * s.ci);
  for (; j < count; ++j) stride2_block<1, OB, CR>(dy, weights, s, ih / 2, j, taps, tap_count, out + 2 * j * s.ci);
}

template <int CR>
void stride2_image(const uint32_t* dy, const __m512i* weights, const Stride2Shape& s, uint16_t* dx) {
  const int64_t per_block = 9 * CR / 2;
  const bool pairs = (s.w + 1) / 2 < 16;  // as in convolve_rows: 8 pixels x 32 channels on narrow rows
  for (int64_t ih = 0; ih < s.h; ++ih)
    for (int parity = 0; parity < 2; ++parity) {
      // rows: even ih -> kh 1 at ho = ih / 2; odd -> kh 0 at ih / 2 + 1 and kh 2 at ih / 2; columns alike
      Tap taps[4];
      int tap_count = 0;
      for (int kh = 0; kh < 3; ++kh) {
        if ((kh == 1) != (ih % 2 == 0)) continue;
        for (int kw = 0; kw < 3; ++kw) {
          if ((kw == 1) != (parity == 0)) continue;
          taps[tap_count++] = Tap{kh == 0 ? 1 : 0, kw == 0 ? 1 : 0, kh * 3 + kw};
        }
      }
      uint16_t* out = dx + (ih * s.w + parity) * s.ci;
      int64_t ob = 0;
      if (pairs)
        for (; ob + 2 <= s.ci / 16; ob += 2)
          stride2_row<2, CR>(dy, weights + ob * per_block, s, ih, parity, taps, tap_count, out + ob * 16);
      for (; ob < s.ci / 16; ++ob)
        stride2_row<1, CR>(dy, weights + ob * per_block, s, ih, parity, taps, tap_count, out + ob * 16);
    }
}

}  // namespace

// x [N, Ci, H, W] bf16 channels_last, w [Co, Ci, 3, 3]; returns y [N, Co, Ho, Wo] bf16 channels_last.
// transpose=true (stride 1 only): w is read as w^T with flipped taps, so y has w.size(1) channels.
torch::Tensor convolution(const torch::Tensor& x, const torch::Tensor& weight, int64_t stride, bool transpose) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "a bf16 channels_last input expected");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "3x3 weights expected");
  TORCH_CHECK(stride == 1 || (stride == 2 && !transpose), "stride 1, or 2 without transpose");
  const int64_t co = transpose ? weight.size(1) : weight.size(0), ci = transpose ? weight.size(0) : weight.size(1);
  TORCH_CHECK(x.size(1) == ci, "the input's channels do not match the weights");
  TORCH_CHECK((ci == 16 || ci == 32 || ci == 48 || ci == 64) && co % 16 == 0,
              "16, 32, 48 or 64 input channels and a multiple of 16 output channels expected");
  const Shape s{ci, x.size(2), x.size(3), co, (x.size(2) - 1) / stride + 1, (x.size(3) - 1) / stride + 1, stride};
  const auto packed = pack_weights(weight, transpose);
  auto y = torch::empty({x.size(0), co, s.ho, s.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      convolve_image(xp + n * s.h * s.w * s.ci, packed.data(), s, yp + n * s.ho * s.wo * s.co);
  });
  return y;
}

// dy [N, Co, Ho, Wo] bf16 channels_last, w [Co, Ci, 3, 3]; returns the input gradient dx [N, Ci, h, w] of a
// stride-2, padding-1 convolution whose input was h x w, bf16 channels_last.
torch::Tensor input_grad_stride2(const torch::Tensor& dy, const torch::Tensor& weight, int64_t h, int64_t w) {
  TORCH_CHECK(dy.scalar_type() == at::kBFloat16 && dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "a bf16 channels_last gradient expected");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "3x3 weights expected");
  const Stride2Shape s{h, w, weight.size(1), dy.size(2), dy.size(3), weight.size(0)};
  TORCH_CHECK(dy.size(1) == s.co && s.ho == (h - 1) / 2 + 1 && s.wo == (w - 1) / 2 + 1,
              "dy does not match a 3x3, padding-1, stride-2 convolution of an input of this size");
  TORCH_CHECK((s.co == 16 || s.co == 32 || s.co == 48 || s.co == 64) && s.ci % 16 == 0,
              "16, 32, 48 or 64 output channels and a multiple of 16 input channels expected");
  const auto packed = pack_weights(weight, true);
  auto dx = torch::empty({dy.size(0), s.ci, h, w}, dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto* dyp = reinterpret_cast<const uint32_t*>(dy.data_ptr());
  auto* dxp = reinterpret_cast<uint16_t*>(dx.data_ptr());
  at::parallel_for(0, dy.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint32_t* image = dyp + n * s.ho * s.wo * s.co / 2;
      uint16_t* out = dxp + n * h * w * s.ci;
      switch (s.co) {
        case 16: stride2_image<16>(image, packed.data(), s, out); break;
        case 32: stride2_image<32>(image, packed.data(), s, out); break;
        case 48: stride2_image<48>(image, packed.data(), s, out); break;
        case 64: stride2_image<64>(image, packed.data(), s, out); break;
      }
    }
  });
  return dx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("convolution", &convolution, "3x3, padding-1 convolution of a bf16 channels_last tensor (fp32 accumulation)");
  m.def("input_grad_stride2", &input_grad_stride2, "input gradient of a 3x3, padding-1, stride-2 convolution");
}
