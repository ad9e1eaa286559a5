// Weight gradient of a 3x3 convolution (padding 1, stride 1 or 2, no groups) for bf16 channels_last
// CPU tensors, accumulated and returned in fp32:
//   dW[o][i][kh][kw] = sum over n, ho, wo of dy[n][ho][wo][o] * x[n][ho*s + kh - 1][wo*s + kw - 1][i]
// The Python side (conv3x3.py) checks the shapes and falls back to the native operators otherwise.
//
// Why: oneDNN's weight gradient was the slowest part of a ResNet-20 training step on a 2-core
// Zen 4 (AVX-512 BF16, no AMX): 308-345 GFLOP/s for the stride-1 layers and ~167 for the stride-2
// ones inside the step, against 400-510 for its forward and input-gradient passes.
//
// How: vdpbf16ps multiplies pairs of bf16 values and adds both products to one fp32 lane. The
// pairs here are one pixel of two images (n, n+1): each lane of an accumulator is one output
// channel o; the other operand is the pair (x[n][..][i], x[n+1][..][i]) broadcast to all lanes.
// Per group of image pairs, x is copied, zero-padded and pair-interleaved into a buffer and dy
// pair-interleaved into another (both stay in L2); then for each block of 16 accumulators (one
// output-channel block of 16, one tap, 16 input channels) the loop walks every output pixel of the
// group with one load of dy and 16 broadcast-multiply-adds. Threads take disjoint image pairs and
// sum their fp32 partial gradients at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kMinPixelsPerGroup = 256;  // amortises the accumulators' loads and stores

// 16 bf16 of row a and 16 of row b as 16 pairs (a[j], b[j]).
inline __m512i interleave16(const uint16_t* a, const uint16_t* b, __m512i order) {
  const __m256i ra = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i rb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  return _mm512_permutexvar_epi16(order, _mm512_inserti64x4(_mm512_castsi256_si512(ra), rb, 1));
}

// Zero-filled uint32 storage starting on a 64-byte boundary, so that every 16-channel group of a
// pixel the loops below read is one cache line, not two halves of neighbouring ones.
class LineAlignedBuffer {
 public:
  explicit LineAlignedBuffer(int64_t size) : storage_(size + 16, 0u) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = storage_.data() + ((64 - address % 64) % 64) / sizeof(uint32_t);
  }
  uint32_t* data() { return data_; }

 private:
  std::vector<uint32_t> storage_;
  uint32_t* data_;
};

struct Shape {
  int64_t n, ci, h, w, co, ho, wo, stride;
};

// Accumulates the images [2 * pair_begin, 2 * pair_end) into acc, laid out [co/16][9][ci][16].
void accumulate_pairs(const uint16_t* x, const uint16_t* dy, const Shape& s, int64_t pair_begin,
                      int64_t pair_end, float* acc) {
  alignas(64) uint16_t order_index[32];
  for (int j = 0; j < 16; ++j) {
    order_index[2 * j] = j;
    order_index[2 * j + 1] = 16 + j;
  }
  const __m512i order = _mm512_load_si512(order_index);
  const std::vector<uint16_t> zeros(std::max(s.ci, s.co), 0);
  const int64_t hp = s.h + 2, wp = s.w + 2, pixels = s.ho * s.wo;
  const int64_t group = std::max<int64_t>(1, kMinPixelsPerGroup / pixels);
  LineAlignedBuffer xb(group * hp * wp * s.ci);  // zero borders stay zero
  LineAlignedBuffer db(group * pixels * s.co);
  const int64_t x_image = s.h * s.w * s.ci, dy_image = pixels * s.co;  // bf16 values per image
  for (int64_t p0 = pair_begin; p0 < pair_end; p0 += group) {
    const int64_t pairs = std::min(group, pair_end - p0);
    // The next group's images, pulled into the caches a line at a time while this group computes: the
    // copies below would otherwise wait on memory with the multiply-adds idle.
    const int64_t next_begin = std::min(2 * (p0 + group), s.n);
    const int64_t next_end = std::min(2 * std::min(p0 + 2 * group, pair_end), s.n);
    const char* prefetch[2] = {reinterpret_cast<const char*>(x + next_begin * x_image),
                               reinterpret_cast<const char*>(dy + next_begin * dy_image)};
    const char* const prefetch_end[2] = {reinterpret_cast<const char*>(x + next_end * x_image),
                                         reinterpret_cast<const char*>(dy + next_end * dy_image)};
    for (int64_t g = 0; g < pairs; ++g) {
      const int64_t n0 = 2 * (p0 + g), n1 = n0 + 1;
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w) {
          const int64_t offset = (h * s.w + w) * s.ci;
          uint32_t* dst = xb.data() + ((g * hp + h + 1) * wp + w + 1) * s.ci;
          for (int64_t c = 0; c < s.ci; c += 16) {
            const uint16_t* a = x + n0 * s.h * s.w * s.ci + offset + c;
            const uint16_t* b = n1 < s.n ? x + n1 * s.h * s.w * s.ci + offset + c : zeros.data();
            _mm512_storeu_si512(dst + c, interleave16(a, b, order));
          }
        }
      for (int64_t q = 0; q < pixels; ++q)
        for (int64_t c = 0; c < s.co; c += 16) {
          const uint16_t* a = dy + (n0 * pixels + q) * s.co + c;
          const uint16_t* b = n1 < s.n ? dy + (n1 * pixels + q) * s.co + c : zeros.data();
          _mm512_storeu_si512(db.data() + (g * pixels + q) * s.co + c, interleave16(a, b, order));
        }
    }
    for (int64_t ob = 0; ob < s.co / 16; ++ob)
      for (int k = 0; k < 9; ++k)
        for (int64_t i0 = 0; i0 < s.ci; i0 += 16) {
          float* out = acc + ((ob * 9 + k) * s.ci + i0) * 16;
          __m512 sums[16];
          for (int ii = 0; ii < 16; ++ii) sums[ii] = _mm512_loadu_ps(out + ii * 16);
          for (int64_t g = 0; g < pairs; ++g)
            for (int64_t ho = 0; ho < s.ho; ++ho) {
              const uint32_t* xrow = xb.data() + ((g * hp + ho * s.stride + k / 3) * wp + k % 3) * s.ci + i0;
              const uint32_t* drow = db.data() + (g * pixels + ho * s.wo) * s.co + ob * 16;
              for (int64_t wo = 0; wo < s.wo; ++wo) {
                const int stream = prefetch[0] < prefetch_end[0] ? 0 : 1;
                if (prefetch[stream] < prefetch_end[stream]) {
                  _mm_prefetch(prefetch[stream], _MM_HINT_T0);
                  prefetch[stream] += 64;
                }
                const __m512bh d = (__m512bh)_mm512_loadu_si512(drow + wo * s.co);
                const uint32_t* xp = xrow + wo * s.stride * s.ci;
#pragma GCC unroll 16
                for (int ii = 0; ii < 16; ++ii)
                  sums[ii] = _mm512_dpbf16_ps(sums[ii], d, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[ii])));
              }
            }
          for (int ii = 0; ii < 16; ++ii) _mm512_storeu_ps(out + ii * 16, sums[ii]);
        }
  }
}

}  // namespace

// dy [N, Co, Ho, Wo] and x [N, Ci, H, W], both bf16 channels_last; returns dW [Co, Ci, 3, 3] fp32.
torch::Tensor weight_grad(const torch::Tensor& dy, const torch::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && dy.scalar_type() == at::kBFloat16, "bf16 tensors expected");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "channels_last tensors expected");
  const Shape s{x.size(0), x.size(1), x.size(2), x.size(3), dy.size(1), dy.size(2), dy.size(3), stride};
  TORCH_CHECK(s.ci % 16 == 0 && s.co % 16 == 0, "channel counts must be multiples of 16");
  TORCH_CHECK(dy.size(0) == s.n && s.ho == (s.h - 1) / stride + 1 && s.wo == (s.w - 1) / stride + 1,
              "dy does not match a 3x3, padding-1 convolution of x with this stride");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* dyp = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  const int64_t pairs = (s.n + 1) / 2, size = 9 * s.ci * s.co;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs));
  std::vector<float> partial(parts * size, 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      accumulate_pairs(xp, dyp, s, pairs * part / parts, pairs * (part + 1) / parts, partial.data() + part * size);
  });
  auto grad = torch::zeros({s.co, s.ci, 3, 3}, x.options().dtype(at::kFloat));
  float* g = grad.data_ptr<float>();
  for (int64_t part = 0; part < parts; ++part) {
    const float* a = partial.data() + part * size;
    for (int64_t ob = 0; ob < s.co / 16; ++ob)
      for (int k = 0; k < 9; ++k)
        for (int64_t i = 0; i < s.ci; ++i)
          for (int j = 0; j < 16; ++j) g[((ob * 16 + j) * s.ci + i) * 9 + k] += a[((ob * 9 + k) * s.ci + i) * 16 + j];
  }
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_grad", &weight_grad, "fp32 weight gradient of a 3x3, padding-1 bf16 channels_last convolution");
}
