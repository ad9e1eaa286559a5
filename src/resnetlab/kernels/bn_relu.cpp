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

// Per-lane sums of f(row, lane) and h(row, lane) over all rows, folded to channels: {sum_f[C], sum_h[C]}.
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
          sf[l] += f(r * V + l, l);
          sh[l] += h(r * V + l, l);
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
    shift[l] = b[c] - m[c] * scale[l];
  }
}

inline float normalize(uint16_t x, float scale, float shift) { return bf16_to_float(x) * scale + shift; }

template <int C, bool kResidual>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& residual, double eps) {
  constexpr int V = C < 32 ? 32 : C;
  const int64_t rows = x.numel() / V, count = x.numel() / C;
  const uint16_t* __restrict xp = bf16_data(x);
  const auto sums = channel_sums<C, V>(
      rows, [&](int64_t i, int) { return bf16_to_float(xp[i]); },
      [&](int64_t i, int) { const float v = bf16_to_float(xp[i]); return v * v; });

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
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    float sc[V], sh[V];  // local copies: the compiler keeps them out of the aliasing analysis
    for (int l = 0; l < V; ++l) { sc[l] = scale[l]; sh[l] = shift[l]; }
    for (int64_t r = r0; r < r1; ++r)
      for (int l = 0; l < V; ++l) {
        float v = normalize(xp[r * V + l], sc[l], sh[l]);
        if constexpr (kResidual) v += bf16_to_float(rp[r * V + l]);
        yp[r * V + l] = float_to_bf16(v > 0.f ? v : 0.f);
      }
  });
  return {y, mean, invstd, var};
}

// With g = dy * (y > 0): dbias = sum g, dweight = invstd * sum g (x - mean),
// dx = weight * invstd * (g - sum g / n - (x - mean) * invstd^2 * sum g (x - mean) / n), dresidual = g.
// Without a residual, y > 0 is recomputed from x (read anyway) with the forward's own arithmetic
// (normalize, from the same scale and shift), so y is neither kept nor read: a quarter less memory
// traffic. With one, the mask needs y (or the residual): y is read.
template <int C, bool kResidual>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
                                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                                      const at::Tensor& invstd) {
  constexpr int V = C < 32 ? 32 : C;
  const int64_t rows = x.numel() / V, count = x.numel() / C;
  const uint16_t* __restrict xp = bf16_data(x);
  const uint16_t* __restrict yp = kResidual ? bf16_data(y) : nullptr;
  const uint16_t* __restrict gp = bf16_data(grad_y);
  float mu[V], scale[V], shift[V];
  scale_and_shift<C, V>(weight, bias, mean, invstd, scale, shift);
  for (int l = 0; l < V; ++l) mu[l] = mean.data_ptr<float>()[l % C];
  // The load of dy is unconditional so that the masked select vectorises.
  auto masked_grad = [&](int64_t i, int l) {
    const float g = bf16_to_float(gp[i]);
    if constexpr (kResidual) return bf16_to_float(yp[i]) > 0.f ? g : 0.f;
    else return normalize(xp[i], scale[l], shift[l]) > 0.f ? g : 0.f;
  };
  const auto sums = channel_sums<C, V>(
      rows, [&](int64_t i, int l) { return masked_grad(i, l); },
      [&](int64_t i, int l) { return masked_grad(i, l) * (bf16_to_float(xp[i]) - mu[l]); });

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
        const float g = masked_grad(i, l);
        dxp[i] = float_to_bf16(a[l] * g + bc[l] * (bf16_to_float(xp[i]) - m[l]) + k[l]);
        if constexpr (kResidual) drp[i] = float_to_bf16(g);
      }
  });
  if (kResidual) return {grad_x, grad_weight, grad_bias, grad_residual};
  return {grad_x, grad_weight, grad_bias};
}

#define RESNETLAB_FOR_EACH_WIDTH(MACRO) \
  MACRO(16) MACRO(32) MACRO(64) MACRO(128) MACRO(256) MACRO(512) MACRO(1024) MACRO(2048)

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& residual, double eps) {
  const bool has_residual = residual.has_value();
  const at::Tensor r = has_residual ? *residual : at::Tensor();
  switch (x.size(1)) {
#define CASE(C) \
  case C: return has_residual ? forward_impl<C, true>(x, weight, bias, r, eps) : forward_impl<C, false>(x, weight, bias, r, eps);
    RESNETLAB_FOR_EACH_WIDTH(CASE)
#undef CASE
    default: TORCH_CHECK(false, "bn_relu: unsupported channel count ", x.size(1));
  }
}

// y: the forward's output where there was a residual, else unused (an undefined tensor will do).
std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                 const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  const bool has_residual = y.has_value();
  const at::Tensor out = has_residual ? *y : at::Tensor();
  switch (x.size(1)) {
#define CASE(C)                                                                                 \
  case C: return has_residual ? backward_impl<C, true>(grad_y, x, out, weight, bias, mean, invstd) \
                              : backward_impl<C, false>(grad_y, x, out, weight, bias, mean, invstd);
    RESNETLAB_FOR_EACH_WIDTH(CASE)
#undef CASE
    default: TORCH_CHECK(false, "bn_relu: unsupported channel count ", x.size(1));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "y, mean, invstd, biased var = relu(batch_norm(x) [+ residual])");
  m.def("backward", &backward, "grad x, grad weight, grad bias [, grad residual]");
}
