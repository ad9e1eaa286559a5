// Training-mode batch norm fused with the ReLU that follows it, and optionally with the residual
// addition in between: y = relu(bn(x) [+ residual]). CPU, bf16, channels_last only; the Python side
// (batch_norm_relu.py) checks that and falls back to the native operators otherwise.
//
// Why: on a 2-core CPU the native bf16 channels_last kernels (batch norm, add, ReLU, each forward
// and backward) take ~20 % of a ResNet-20 step, 20-40x the time a copy of the same tensors takes.
// Fused, each layer reads its input twice and writes once forward; backward it reads dy and x twice
// (and y too where there is a residual) and writes dx (and the residual's gradient).
//
// Layout: a channels_last tensor is a [rows, C] matrix. Each loop walks rows of V = max(C, 32)
// lanes, lane l holding channel l % C, so that 16-channel layers also fill whole AVX-512 vectors;
// loops over lanes have a compile-time length and vectorise. Statistics are accumulated in fp32
// over blocks of 128 rows and in double across blocks.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch does. No NaN special case (it would cost the loops their vectorisation):
// a NaN whose payload lies only in the low 16 bits becomes inf, still non-finite for the divergence check.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline const uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline uint16_t* bf16_data_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

constexpr int64_t kGrain = 1024;      // rows per parallel task
constexpr int64_t kBlockRows = 128;   // rows summed in fp32 before adding into the double totals

// Per-lane sums of f(i, lane, row) and h(i, lane, row) over all rows (i: the element, row * V + lane),
// folded to channels: {sum_f[C], sum_h[C]}.
template <int C, int V, typename F, typename H>
std::vector<double> channel_sums(int64_t rows, F f, H h) {
  const int threads = at::get_num_threads();
  std::vector<double> partial(size_t(threads) * 2 * V, 0.0);
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    double* total_f = &partial[size_t(at::get_thread_num()) * 2 * V];
    double* total_h = total_f + V;
    for (int64_t b = r0; b < r1; b += kBlockRows) {
      float sf[V] = {0}, sh[V] = {0};
      const int64_t end = std::min(r1, b + kBlockRows);
      for (int64_t r = b; r < end; ++r)
        for (int l = 0; l < V; ++l) {
          sf[l] += f(r * V + l, l, r);
          sh[l] += h(r * V + l, l, r);
        }
      for (int l = 0; l < V; ++l) { total_f[l] += sf[l]; total_h[l] += sh[l]; }
    }
  });
  std::vector<double> sums(2 * C, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int l = 0; l < V; ++l) {
      sums[l % C] += partial[size_t(t) * 2 * V + l];
      sums[C + l % C] += partial[size_t(t) * 2 * V + V + l];
    }
  return sums;
}

// bn(x) = x * scale + shift per lane, from the float mean and invstd that the backward pass gets too,
// so that the backward pass can recompute the forward's ReLU mask bit for bit.
template <int C, int V>
void scale_and_shift(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                     const at::Tensor& invstd, float* scale, float* shift) {
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float* m = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  for (int l = 0; l < V; ++l) {
    const int c = l % C;
    scale[l] = w[c] * is[c];
    shift[l] = std::fma(-m[c], scale[l], b[c]);
  }
}

// Explicit fused multiply-adds here and in scale_and_shift, so that another kernel can recompute the ReLU
// mask bit for bit (conv_fwd.cpp's input gradient before a BN + ReLU, from `affine` below).
inline float normalize(uint16_t x, float scale, float shift) { return std::fma(bf16_to_float(x), scale, shift); }

// x's per-channel sums and sums of squares {sum[C], sum_squares[C]}: the given ones (the convolution that
// wrote x gathered them: kernels/conv_fwd.cpp), else from a pass over x.
template <int C, int V>
std::vector<double> statistics_sums(const uint16_t* xp, int64_t rows, const c10::optional<at::Tensor>& given) {
  if (given.has_value()) {
    const double* g = given->data_ptr<double>();
    return std::vector<double>(g, g + 2 * C);
  }
  return channel_sums<C, V>(
      rows, [&](int64_t i, int, int64_t) { return bf16_to_float(xp[i]); },
      [&](int64_t i, int, int64_t) { const float v = bf16_to_float(xp[i]); return v * v; });
}

template <int C, bool kResidual>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& residual, double eps, const c10::optional<at::Tensor>& given_sums) {
  constexpr int V = C < 32 ? 32 : C;
  const int64_t rows = x.numel() / V, count = x.numel() / C;
  const uint16_t* __restrict xp = bf16_data(x);
  const auto sums = statistics_sums<C, V>(xp, rows, given_sums);

  const auto stats_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({C}, stats_options), invstd = at::empty({C}, stats_options);
  at::Tensor var = at::empty({C}, stats_options);  // biased; Python turns it into the running estimate
  for (int c = 0; c < C; ++c) {
    const double m = sums[c] / count, v = std::max(sums[C + c] / count - m * m, 0.0);
    mean.data_ptr<float>()[c] = float(m);
    invstd.data_ptr<float>()[c] = float(1.0 / std::sqrt(v + eps));
    var.data_ptr<float>()[c] = float(v);
  }
  float scale[V], shift[V];
  scale_and_shift<C, V>(weight, bias, mean, invstd, scale, shift);

  at::Tensor y = at::empty_like(x);
  uint16_t* __restrict yp = bf16_data_mut(y);
  const uint16_t* __restrict rp = kResidual ? bf16_data(residual) : nullptr;
  // With a residual, the ReLU mask y > 0 is kept as bits for the backward pass (mask_bits, above).
  at::Tensor mask = kResidual ? at::zeros({(rows + 15) / 16 * V}, x.options().dtype(at::kShort)) : at::Tensor();
  uint16_t* __restrict mp = kResidual ? reinterpret_cast<uint16_t*>(mask.data_ptr<int16_t>()) : nullptr;
  // Tasks take whole groups of 16 rows, so that no two threads write the same mask word.
  at::parallel_for(0, (rows + 15) / 16, kGrain / 16, [&](int64_t g0, int64_t g1) {
    float sc[V], sh[V];  // local copies: the compiler keeps them out of the aliasing analysis
    for (int l = 0; l < V; ++l) { sc[l] = scale[l]; sh[l] = shift[l]; }
    for (int64_t r = g0 * 16; r < std::min(rows, g1 * 16); ++r) {
      uint16_t* __restrict bits = kResidual ? mp + (r / 16) * V : nullptr;
      const int bit = int(r % 16);
      for (int l = 0; l < V; ++l) {
        float v = normalize(xp[r * V + l], sc[l], sh[l]);
        if constexpr (kResidual) v += bf16_to_float(rp[r * V + l]);
        const uint16_t out = float_to_bf16(v > 0.f ? v : 0.f);
        yp[r * V + l] = out;
        if constexpr (kResidual) bits[l] |= uint16_t(uint16_t(out != 0) << bit);
      }
    }
  });
  if (kResidual) return {y, mean, invstd, var, mask};
  return {y, mean, invstd, var};
}

// With g = dy * (y > 0): dbias = sum g, dweight = invstd * sum g (x - mean),
// dx = weight * invstd * (g - sum g / n - (x - mean) * invstd^2 * sum g (x - mean) / n), dresidual = g.
// Without a residual, y > 0 is recomputed from x (read anyway) with the forward's own arithmetic
// (normalize, from the same scale and shift), so y is neither kept nor read: a quarter less memory
// traffic. With one, the mask would need y (or the residual) too: the forward pass keeps it as bits
// instead, one per value, so each of the two passes reads 1/16 of what reading y cost. Word
// (row / 16) * V + lane holds the bits of 16 consecutive rows (bit row % 16), so a row's mask loads as
// contiguous words shifted by one common amount: the loops vectorise as they did reading y.
// given_sums: {sum g, sum g (x - mean)} per channel ([2, C] float64) where the kernel that wrote dy
// gathered them (conv_fwd.cpp: input_grad_with_bn_sums), sparing the first pass.
template <int C, bool kResidual>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask_bits,
                                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                                      const at::Tensor& invstd, const c10::optional<at::Tensor>& given_sums) {
  constexpr int V = C < 32 ? 32 : C;
  const int64_t rows = x.numel() / V, count = x.numel() / C;
  const uint16_t* __restrict xp = bf16_data(x);
  const uint16_t* __restrict mp = kResidual ? reinterpret_cast<const uint16_t*>(mask_bits.data_ptr<int16_t>()) : nullptr;
  const uint16_t* __restrict gp = bf16_data(grad_y);
  float mu[V], scale[V], shift[V];
  scale_and_shift<C, V>(weight, bias, mean, invstd, scale, shift);
  for (int l = 0; l < V; ++l) mu[l] = mean.data_ptr<float>()[l % C];
  // The load of dy is unconditional so that the masked select vectorises.
  auto masked_grad = [&](int64_t i, int l, int64_t r) {
    const float g = bf16_to_float(gp[i]);
    if constexpr (kResidual) return (mp[(r / 16) * V + l] >> (r % 16)) & 1u ? g : 0.f;
    else return normalize(xp[i], scale[l], shift[l]) > 0.f ? g : 0.f;
  };
  const auto sums = given_sums.has_value()
      ? std::vector<double>(given_sums->data_ptr<double>(), given_sums->data_ptr<double>() + 2 * C)
      : channel_sums<C, V>(
            rows, [&](int64_t i, int l, int64_t r) { return masked_grad(i, l, r); },
            [&](int64_t i, int l, int64_t r) { return masked_grad(i, l, r) * (bf16_to_float(xp[i]) - mu[l]); });

  const float* w = weight.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  at::Tensor grad_weight = at::empty({C}, weight.options()), grad_bias = at::empty({C}, weight.options());
  float k_grad[V], k_centered[V], k_const[V];
  for (int c = 0; c < C; ++c) {
    const double s = sums[c], sx = sums[C + c], i = is[c];
    grad_bias.data_ptr<float>()[c] = float(s);
    grad_weight.data_ptr<float>()[c] = float(sx * i);
    for (int l = c; l < V; l += C) {
      k_grad[l] = float(w[c] * i);
      k_centered[l] = float(-w[c] * i * i * i * sx / count);
      k_const[l] = float(-w[c] * i * s / count);
    }
  }

  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_residual = kResidual ? at::empty_like(x) : at::Tensor();
  uint16_t* __restrict dxp = bf16_data_mut(grad_x);
  uint16_t* __restrict drp = kResidual ? bf16_data_mut(grad_residual) : nullptr;
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    float a[V], bc[V], k[V], m[V];
    for (int l = 0; l < V; ++l) { a[l] = k_grad[l]; bc[l] = k_centered[l]; k[l] = k_const[l]; m[l] = mu[l]; }
    for (int64_t r = r0; r < r1; ++r)
      for (int l = 0; l < V; ++l) {
        const int64_t i = r * V + l;
        const float g = masked_grad(i, l, r);
        dxp[i] = float_to_bf16(a[l] * g + bc[l] * (bf16_to_float(xp[i]) - m[l]) + k[l]);
        if constexpr (kResidual) drp[i] = float_to_bf16(g);
      }
  });
  if (kResidual) return {grad_x, grad_weight, grad_bias, grad_residual};
  return {grad_x, grad_weight, grad_bias};
}

#define RESNETLAB_FOR_EACH_WIDTH(MACRO) \
  MACRO(16) MACRO(32) MACRO(64) MACRO(128) MACRO(256) MACRO(512) MACRO(1024) MACRO(2048)

void check_sums(const c10::optional<at::Tensor>& sums, const at::Tensor& x) {
  TORCH_CHECK(!sums.has_value() || (sums->scalar_type() == at::kDouble && sums->is_contiguous() &&
                                    sums->dim() == 2 && sums->size(0) == 2 && sums->size(1) == x.size(1)),
              "bn_relu: the sums must be a contiguous [2, C] float64 tensor");
}

// sums: x's per-channel sums and sums of squares, [2, C] float64, where the caller has them.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& residual, double eps,
                                const c10::optional<at::Tensor>& sums) {
  check_sums(sums, x);
  const bool has_residual = residual.has_value();
  const at::Tensor r = has_residual ? *residual : at::Tensor();
  switch (x.size(1)) {
#define CASE(C) \
  case C: return has_residual ? forward_impl<C, true>(x, weight, bias, r, eps, sums) \
                              : forward_impl<C, false>(x, weight, bias, r, eps, sums);
    RESNETLAB_FOR_EACH_WIDTH(CASE)
#undef CASE
    default: TORCH_CHECK(false, "bn_relu: unsupported channel count ", x.size(1));
  }
}

// mask_bits: the forward's last output where there was a residual; none without one.
std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& mask_bits, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                                 const c10::optional<at::Tensor>& sums) {
  check_sums(sums, x);
  const bool has_residual = mask_bits.has_value();
  const at::Tensor out = has_residual ? *mask_bits : at::Tensor();
  TORCH_CHECK(!has_residual || (out.scalar_type() == at::kShort && out.numel() == (x.numel() / std::max<int64_t>(
                                    x.size(1), 32) + 15) / 16 * std::max<int64_t>(x.size(1), 32)),
              "bn_relu: the mask bits do not belong to this input");
  switch (x.size(1)) {
#define CASE(C)                                                                                 \
  case C: return has_residual ? backward_impl<C, true>(grad_y, x, out, weight, bias, mean, invstd, sums) \
                              : backward_impl<C, false>(grad_y, x, out, weight, bias, mean, invstd, sums);
    RESNETLAB_FOR_EACH_WIDTH(CASE)
#undef CASE
    default: TORCH_CHECK(false, "bn_relu: unsupported channel count ", x.size(1));
  }
}

// The per-channel scale and shift of bn(x) = x * scale + shift, float32 [C] each, exactly as the kernels
// compute them: for a kernel elsewhere that recomputes the ReLU mask as fma(x, scale, shift) > 0.
std::vector<at::Tensor> affine(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                               const at::Tensor& invstd) {
  const int64_t channels = weight.numel();
  at::Tensor scale = at::empty({channels}, weight.options()), shift = at::empty({channels}, weight.options());
  switch (channels) {
#define CASE(C) \
  case C: { float sc[C < 32 ? 32 : C], sh[C < 32 ? 32 : C]; \
            scale_and_shift<C, (C < 32 ? 32 : C)>(weight, bias, mean, invstd, sc, sh); \
            std::memcpy(scale.data_ptr<float>(), sc, C * 4); std::memcpy(shift.data_ptr<float>(), sh, C * 4); break; }
    RESNETLAB_FOR_EACH_WIDTH(CASE)
#undef CASE
    default: TORCH_CHECK(false, "bn_relu: unsupported channel count ", channels);
  }
  return {scale, shift};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "y, mean, invstd, biased var [, ReLU mask bits] = relu(batch_norm(x) [+ residual])", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("eps"), py::arg("sums") = py::none());
  m.def("backward", &backward, "grad x, grad weight, grad bias [, grad residual]", py::arg("grad_y"), py::arg("x"),
        py::arg("mask_bits"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("invstd"),
        py::arg("sums") = py::none());
  m.def("affine", &affine, "the per-channel scale and shift of bn(x) = x * scale + shift, as the kernels compute them");
}
