// Fused ensemble AdamW step: one torch.optim.AdamW step (decoupled weight decay, no amsgrad, not
// maximizing) on the compact fp32 delta and its moments, then the ensemble rows/columns of the
// weight rewritten from the untouched base copy:
//
//   delta *= 1 - lr * wd                                   (when wd != 0)
//   m      = lerp(m, g, 1 - beta1)
//   v      = v * beta2 + (1 - beta2) * (g * g)
//   denom  = sqrt(v) * (1 / sqrt(1 - beta2^step)) + eps
//   delta += -(lr / (1 - beta1^step)) * (m / denom)
//   weight[index[k], j] (dim 0) or weight[i, index[k]] (dim 1) = rne(float(base) + scale * delta)
//
// Bit-compatibility with torch on CUDA: the per-element arithmetic is fp32 and reproduces what the
// torch CUDA kernels of the single-tensor step compute, rounding for rounding: each torch op is
// one rounding (explicit __f*_rn intrinsics, which the compiler never contracts), except where the
// torch kernel itself is one fused multiply-add: lerp (`self + w * (end - self)`, contracted by
// nvcc), addcmul and addcdiv (`fma(alpha, b op c, a)`, and for alpha == 1 `fma(b, c, a)` resp.
// `a + b / c`: at::native::pointwise_op_impl), which use __fmaf_rn here. Scalars are the double
// values torch computes in Python, converted to float as TensorIterator does; the division by
// sqrt(bias_correction2), a CPU scalar, is a multiplication by its float reciprocal (torch's
// div_true_kernel_cuda). Bias corrections are computed in double on the host.
#include <cmath>

#include "common.cuh"

namespace kne {
namespace cuda {
namespace {

struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay (used when apply_decay)
  float lerp_weight;    // 1 - beta1
  float one_minus_lerp; // 1 - (1 - beta1), in float (the large-weight branch of torch's lerp)
  float beta2;
  float one_minus_beta2;
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^step), a float reciprocal of the float value
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float scale;
  bool apply_decay;
  bool addcmul_unit;       // 1 - beta2 == 1 (beta2 = 0): torch's addcmul is fma(g, g, v)
  bool addcdiv_unit;       // -step_size == 1: torch's addcdiv is delta + m / denom
  bool small_lerp_weight;  // |1 - beta1| < 0.5: torch's lerp uses self + w * (end - self)
};

// One compact element per thread (grid-stride). The compact state is [rows, cols] row-major:
// dim 0: rows = K ensemble rows, cols = in; dim 1: rows = out, cols = K ensemble columns.
template <typename W, int kDim>
__global__ void __launch_bounds__(256)
    adamw_kernel(W* __restrict__ weight, const int64_t* __restrict__ index,
                 const float* __restrict__ grad, float* __restrict__ delta,
                 float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                 const W* __restrict__ base, AdamWScalars c, int64_t rows, int64_t cols,
                 int64_t in_features, int64_t index_limit) {
  const int64_t n = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = grad[e];
    float d = delta[e], m = exp_avg[e], v = exp_avg_sq[e];
    if (c.apply_decay) d = __fmul_rn(d, c.decay);
    // exp_avg.lerp_(grad, 1 - beta1)
    const float diff = __fsub_rn(g, m);
    m = c.small_lerp_weight ? __fmaf_rn(c.lerp_weight, diff, m)
                            : __fmaf_rn(-diff, c.one_minus_lerp, g);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    v = __fmul_rn(v, c.beta2);
    v = c.addcmul_unit ? __fmaf_rn(g, g, v) : __fmaf_rn(c.one_minus_beta2, __fmul_rn(g, g), v);
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), c.inv_bc2_sqrt), c.eps);
    // delta.addcdiv_(exp_avg, denom, value=-step_size)
    const float q = __fdiv_rn(m, denom);
    d = c.addcdiv_unit ? __fadd_rn(d, q) : __fmaf_rn(c.neg_step_size, q, d);
    delta[e] = d;
    exp_avg[e] = m;
    exp_avg_sq[e] = v;
    // weight[index] = (base.float() + scale * delta).to(weight.dtype)
    const float w = __fadd_rn(detail::to_float(base[e]), __fmul_rn(c.scale, d));
    const int64_t r = e / cols;
    const int64_t col = e - r * cols;
    const int64_t i = __ldg(index + (kDim == 0 ? r : col));
    // Indices are validated by the public API; one outside the weight is skipped, never written.
    if (static_cast<uint64_t>(i) < static_cast<uint64_t>(index_limit))
      weight[kDim == 0 ? i * in_features + col : r * in_features + i] = detail::from_float<W>(w);
  }
}

}  // namespace

namespace launch {

cudaError_t ensemble_adamw_step(void* weight, DType dtype, const int64_t* index, const float* grad,
                                float* delta, float* exp_avg, float* exp_avg_sq, const void* base,
                                int64_t out_features, int64_t in_features, int64_t K, int dim,
                                int64_t step, double lr, double scale, double beta1, double beta2,
                                double eps, double weight_decay, cudaStream_t stream) {
  const int64_t rows = dim == 0 ? K : out_features;
  const int64_t cols = dim == 0 ? in_features : K;
  if (rows == 0 || cols == 0) return cudaSuccess;

  // Host scalars exactly as torch's _single_tensor_adam computes them (Python floats = double).
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  AdamWScalars c;
  c.apply_decay = weight_decay != 0.0;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.lerp_weight = static_cast<float>(1.0 - beta1);
  c.small_lerp_weight = std::fabs(c.lerp_weight) < 0.5f;
  c.one_minus_lerp = 1.0f - c.lerp_weight;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.inv_bc2_sqrt = 1.0f / static_cast<float>(bias_correction2_sqrt);
  c.eps = static_cast<float>(eps);
  c.neg_step_size = static_cast<float>(-step_size);
  c.scale = static_cast<float>(scale);
  c.addcmul_unit = c.one_minus_beta2 == 1.0f;
  c.addcdiv_unit = c.neg_step_size == 1.0f;

  const int64_t n = rows * cols;
  const unsigned grid = static_cast<unsigned>(
      std::min<int64_t>(detail::ceil_div(n, 256), 32LL * detail::multiprocessor_count()));
  KNE_DISPATCH_DTYPE(dtype, [&] {
    auto* w = static_cast<scalar_t*>(weight);
    const auto* b = static_cast<const scalar_t*>(base);
    if (dim == 0)
      adamw_kernel<scalar_t, 0><<<grid, 256, 0, stream>>>(w, index, grad, delta, exp_avg, exp_avg_sq,
                                                          b, c, rows, cols, in_features, out_features);
    else
      adamw_kernel<scalar_t, 1><<<grid, 256, 0, stream>>>(w, index, grad, delta, exp_avg, exp_avg_sq,
                                                          b, c, rows, cols, in_features, in_features);
  });
  return cudaGetLastError();
}

}  // namespace launch
}  // namespace cuda
}  // namespace kne
