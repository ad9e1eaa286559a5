// Weight gradient of a 3x3, padding-1, stride-1 convolution of bf16 channels_last CPU tensors by
// Winograd's minimal filtering F(2x2, 3x3), accumulated and returned in fp32. The forward pass is
// y_t = A^T [(G w G^T) . V_t] A per 2x2 output tile t with V_t = B^T d_t B (conv_winograd.cpp); it is
// linear in w, so its gradient is
//   dW = G^T [ sum over tiles t of (A dy_t A^T) . V_t ] G,
// 16 multiply-adds per tile and channel pair where the direct form (conv_wgrad.cpp) needs 36.
// The transformed input and gradient are rounded to bf16 and their products summed in fp32: each
// term carries a relative rounding error of about 2^-9, which the direct kernel's exact bf16
// products don't (tests/test_conv_winograd_wgrad.py bounds the result's error).
//
// Why: the direct weight-gradient kernel's multiply-adds already run at the core's peak
// (docs/speed-notes.md), so fewer of them is what is left.
//
// How: tiles are taken in groups (all tiles of the batch in order, two neighbouring tiles of a row as
// one pair). Per group, x's 4x4 patches are transformed into V[position][tile pair][ci] and dy's 2x2
// tiles into D[position][co/16][tile pair][16]; both hold bf16 pairs (tile t, tile t + 1), which
// vdpbf16ps multiplies and adds into one fp32 lane. For each position, block of 16 output channels
// and block of 16 input channels, 16 accumulators (one per input channel, lanes = output channels)
// take one load of D and 16 broadcasts of V per tile pair. V and D (at most 128 KB each) stay in L2.
// Threads take disjoint ranges of groups and sum their fp32 partial sums at the end; then G^T . G.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroupValues = 4096;  // tiles per group x channels: V and D at most 16 x 4096 x 2 bytes

inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

struct Shape {
  int64_t n, ci, co, h, w;
  int64_t tiles_w() const { return w / 2; }
  int64_t tiles_per_image() const { return (h / 2) * (w / 2); }
};

class Pairing {  // 16 bf16 of a and 16 of b as 16 pairs (a[j], b[j]): the operand layout of vdpbf16ps
 public:
  Pairing() {
    alignas(64) uint16_t index[32];
    for (int j = 0; j < 16; ++j) {
      index[2 * j] = j;
      index[2 * j + 1] = 16 + j;
    }
    order_ = _mm512_load_si512(index);
  }
  void store(uint32_t* dst, __m512 a, __m512 b) const {
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(order_, (__m512i)_mm512_cvtne2ps_pbh(b, a)));
  }

 private:
  __m512i order_;
};

// B^T d of one column w of the patch rows 2 th - 1 .. 2 th + 2, for 16 channels (zeros outside the image).
inline void column_transform(const uint16_t* image, const Shape& s, int64_t th, int64_t w, __m512 col[4]) {
  __m512 d[4];
  for (int r = 0; r < 4; ++r) {
    const int64_t h = 2 * th - 1 + r;
    d[r] = h >= 0 && h < s.h && w >= 0 && w < s.w ? load16(image + (h * s.w + w) * s.ci) : _mm512_setzero_ps();
  }
  col[0] = _mm512_sub_ps(d[0], d[2]);
  col[1] = _mm512_add_ps(d[1], d[2]);
  col[2] = _mm512_sub_ps(d[2], d[1]);
  col[3] = _mm512_sub_ps(d[1], d[3]);
}

// B^T d B of the tile pairs [first_pair, first_pair + pairs) from tile tile0 on, for 16 channels from c0,
// stored as pairs into v[position * position_stride + pair * s.ci]. Neighbouring pairs of a row share two
// columns of their patches: each column is loaded and combined once.
void transform_input(const uint16_t* x, const Shape& s, int64_t tile0, int64_t pairs, int64_t c0,
                     const Pairing& pairing, uint32_t* v, int64_t position_stride) {
  __m512 e[6][4];  // e[column][r]: B^T d of the six columns the pair's patches span
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t tile = tile0 + 2 * p;
    const int64_t n = tile / s.tiles_per_image(), t = tile % s.tiles_per_image();
    const int64_t th = t / s.tiles_w(), tw = t % s.tiles_w();
    const uint16_t* image = x + n * s.h * s.w * s.ci + c0;
    if (p == 0 || tw == 0) {
      column_transform(image, s, th, 2 * tw - 1, e[0]);
      column_transform(image, s, th, 2 * tw, e[1]);
    } else {
      for (int r = 0; r < 4; ++r) {
        e[0][r] = e[4][r];
        e[1][r] = e[5][r];
      }
    }
    for (int col = 2; col < 6; ++col) column_transform(image, s, th, 2 * tw - 1 + col, e[col]);
    uint32_t* out = v + p * s.ci;
    for (int r = 0; r < 4; ++r) {  // (B^T d) B: tile t from columns 0-3, tile t + 1 from columns 2-5
      uint32_t* row = out + (r * 4) * position_stride;
      pairing.store(row, _mm512_sub_ps(e[0][r], e[2][r]), _mm512_sub_ps(e[2][r], e[4][r]));
      pairing.store(row + position_stride, _mm512_add_ps(e[1][r], e[2][r]), _mm512_add_ps(e[3][r], e[4][r]));
      pairing.store(row + 2 * position_stride, _mm512_sub_ps(e[2][r], e[1][r]), _mm512_sub_ps(e[4][r], e[3][r]));
      pairing.store(row + 3 * position_stride, _mm512_sub_ps(e[1][r], e[3][r]), _mm512_sub_ps(e[3][r], e[5][r]));
    }
  }
}

// A dy A^T of the tiles (tile, tile + 1) for 16 output channels from o0, stored as pairs at
// d[position * position_stride].
void transform_grad_pair(const uint16_t* dy, const Shape& s, int64_t tile, int64_t o0, const Pairing& pairing,
                         uint32_t* d, int64_t position_stride) {
  // Both tiles share a row of the map: their 2x2 blocks are the four pixels from (2 th, 2 tw) on.
  const int64_t n = tile / s.tiles_per_image(), t = tile % s.tiles_per_image();
  const int64_t th = t / s.tiles_w(), tw = t % s.tiles_w();
  const uint16_t* top = dy + ((n * s.h + 2 * th) * s.w + 2 * tw) * s.co + o0;
  const uint16_t* bottom = top + s.w * s.co;
  __m512 a[2][4], b[2][4];  // per tile, its two rows times A^T: (d0, d0 + d1, d0 - d1, -d1)
  const __m512 zero = _mm512_setzero_ps();
  for (int k = 0; k < 2; ++k) {
    const __m512 a0 = load16(top + 2 * k * s.co), a1 = load16(top + (2 * k + 1) * s.co);
    const __m512 b0 = load16(bottom + 2 * k * s.co), b1 = load16(bottom + (2 * k + 1) * s.co);
    a[k][0] = a0, a[k][1] = _mm512_add_ps(a0, a1), a[k][2] = _mm512_sub_ps(a0, a1), a[k][3] = _mm512_sub_ps(zero, a1);
    b[k][0] = b0, b[k][1] = _mm512_add_ps(b0, b1), b[k][2] = _mm512_sub_ps(b0, b1), b[k][3] = _mm512_sub_ps(zero, b1);
  }
  for (int c = 0; c < 4; ++c) {  // A times that: rows a, a + b, a - b, -b
    pairing.store(d + c * position_stride, a[0][c], a[1][c]);
    pairing.store(d + (4 + c) * position_stride, _mm512_add_ps(a[0][c], b[0][c]), _mm512_add_ps(a[1][c], b[1][c]));
    pairing.store(d + (8 + c) * position_stride, _mm512_sub_ps(a[0][c], b[0][c]), _mm512_sub_ps(a[1][c], b[1][c]));
    pairing.store(d + (12 + c) * position_stride, _mm512_sub_ps(zero, b[0][c]), _mm512_sub_ps(zero, b[1][c]));
  }
}

// Adds the tiles [tile_begin, tile_end) into acc, laid out [position][co/16][ci][16].
void accumulate_tiles(const uint16_t* x, const uint16_t* dy, const Shape& s, int64_t tile_begin, int64_t tile_end,
                      int64_t group_tiles, float* acc) {
  const Pairing pairing;
  const int64_t group_pairs = group_tiles / 2, blocks_o = s.co / 16;
  std::vector<uint32_t> V(16 * group_pairs * s.ci), D(16 * blocks_o * group_pairs * 16);
  for (int64_t g0 = tile_begin; g0 < tile_end; g0 += group_tiles) {
    const int64_t pairs = std::min(group_tiles, tile_end - g0) / 2;
    for (int64_t c0 = 0; c0 < s.ci; c0 += 16)
      transform_input(x, s, g0, pairs, c0, pairing, V.data() + c0, group_pairs * s.ci);
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t ob = 0; ob < blocks_o; ++ob)
        transform_grad_pair(dy, s, g0 + 2 * p, ob * 16, pairing, D.data() + (ob * group_pairs + p) * 16,
                            blocks_o * group_pairs * 16);
    for (int pos = 0; pos < 16; ++pos)
      for (int64_t ob = 0; ob < blocks_o; ++ob) {
        const uint32_t* d = D.data() + ((pos * blocks_o + ob) * group_pairs) * 16;
        for (int64_t i0 = 0; i0 < s.ci; i0 += 16) {
          float* out = acc + ((pos * blocks_o + ob) * s.ci + i0) * 16;
          const uint32_t* v = V.data() + pos * group_pairs * s.ci + i0;
          __m512 sums[16];
          for (int ii = 0; ii < 16; ++ii) sums[ii] = _mm512_loadu_ps(out + ii * 16);
          for (int64_t p = 0; p < pairs; ++p) {
            const __m512bh dv = (__m512bh)_mm512_loadu_si512(d + p * 16);
            const uint32_t* vp = v + p * s.ci;
#pragma GCC unroll 16
            for (int ii = 0; ii < 16; ++ii)
              sums[ii] = _mm512_dpbf16_ps(sums[ii], dv, (__m512bh)_mm512_set1_epi32(static_cast<int>(vp[ii])));
          }
          for (int ii = 0; ii < 16; ++ii) _mm512_storeu_ps(out + ii * 16, sums[ii]);
        }
      }
  }
}

// G^T M G for one row of four values of M (one position row or column): the three taps.
inline void transform_back(const __m512 m[4], __m512 out[3]) {
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 sum = _mm512_mul_ps(half, _mm512_add_ps(m[1], m[2]));
  out[0] = _mm512_add_ps(m[0], sum);
  out[1] = _mm512_mul_ps(half, _mm512_sub_ps(m[1], m[2]));
  out[2] = _mm512_add_ps(sum, m[3]);
}

}  // namespace

// dy [N, co, H, W] and x [N, ci, H, W], both bf16 channels_last; returns dW [co, ci, 3, 3] fp32.
torch::Tensor winograd_weight_grad(const torch::Tensor& dy, const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && dy.scalar_type() == at::kBFloat16, "bf16 tensors expected");
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "channels_last tensors expected");
  const Shape s{x.size(0), x.size(1), dy.size(1), x.size(2), x.size(3)};
  TORCH_CHECK(s.ci % 16 == 0 && s.co % 16 == 0, "channel counts must be multiples of 16");
  TORCH_CHECK(dy.size(0) == s.n && dy.size(2) == s.h && dy.size(3) == s.w, "dy must have x's batch and map size");
  TORCH_CHECK(s.h % 2 == 0 && s.w % 4 == 0, "the map must have an even height and a width divisible by 4");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* dyp = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  // Groups of an even number of tiles; every range below starts on a pair, and a pair never spans two rows.
  const int64_t tiles = s.n * s.tiles_per_image(), pairs = tiles / 2;
  const int64_t group_tiles = std::max<int64_t>(16, kGroupValues / std::max(s.ci, s.co) / 2 * 2);
  const int64_t size = 16 * s.co * s.ci;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs));
  std::vector<float> partial(parts * size, 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      accumulate_tiles(xp, dyp, s, 2 * (pairs * part / parts), 2 * (pairs * (part + 1) / parts), group_tiles,
                       partial.data() + part * size);
  });
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t j = 0; j < size; ++j) partial[j] += partial[part * size + j];
  auto grad = torch::empty({s.co, s.ci, 3, 3}, x.options().dtype(at::kFloat));
  float* g = grad.data_ptr<float>();
  const int64_t blocks_o = s.co / 16;
  alignas(64) float taps[9][16];
  for (int64_t ob = 0; ob < blocks_o; ++ob)
    for (int64_t i = 0; i < s.ci; ++i) {
      __m512 m[16], rows[4][3];  // rows[r][l]: (M G)[r][l]
      for (int pos = 0; pos < 16; ++pos) m[pos] = _mm512_loadu_ps(partial.data() + ((pos * blocks_o + ob) * s.ci + i) * 16);
      for (int r = 0; r < 4; ++r) transform_back(m + 4 * r, rows[r]);
      for (int l = 0; l < 3; ++l) {
        const __m512 column[4] = {rows[0][l], rows[1][l], rows[2][l], rows[3][l]};
        __m512 out[3];
        transform_back(column, out);
        for (int k = 0; k < 3; ++k) _mm512_store_ps(taps[k * 3 + l], out[k]);
      }
      for (int j = 0; j < 16; ++j)
        for (int tap = 0; tap < 9; ++tap) g[((ob * 16 + j) * s.ci + i) * 9 + tap] = taps[tap][j];
    }
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("winograd_weight_grad", &winograd_weight_grad,
        "fp32 weight gradient of a 3x3, padding-1, stride-1 bf16 channels_last convolution by Winograd F(2x2, 3x3)");
}
