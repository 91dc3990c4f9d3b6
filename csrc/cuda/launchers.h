// Host launchers of the kne CUDA kernels: the only interface between the lean .cu translation
// units (csrc/cuda/<op module>.cu: device code; CUDA headers only, no ATen) and ops_cuda.cpp
// (ATen: validation, device guard, stream, allocation). Every launcher takes raw pointers to contiguous memory, sizes,
// scalars and the stream to run on; it enqueues its kernels and returns the first CUDA error
// (cudaSuccess when all launches were accepted). Inputs are NOT validated here: ops_cuda.cpp does.
//
// Semantics: kne_kernels/ops/<op module>.py (the schema and the pure-torch kernel of each op).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kne {
namespace cuda {
namespace launch {

// Element type of the low-precision-capable inputs (act/grad, weight/grad, weight/base).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[seg[n], d] += scale_value * scale[n] * act[n, d] * grad[n, d]   over n in [0, N)
//   act, grad: [N, D] of `dtype`; out: fp32 [S, D]; segments: int64 [N] or nullptr (all rows in
//   segment 0); scale: fp32 [N] or nullptr. Rows whose id is outside [0, S) are skipped (ids are
//   validated by the public API; the kernel only guarantees it never writes out of bounds).
cudaError_t neuron_attribution(float* out, const void* act, const void* grad, DType dtype,
                               const int64_t* segments, const float* scale, float scale_value,
                               int64_t N, int64_t D, int64_t S, cudaStream_t stream);

// out[seg[n], d] += sum_n p(n, d), p = a * b (|a * b| when `absolute`), times scale[n] and then
// scale_value when given: the column sums of neuron_attribution.cu, shared with weight_attribution
// (dim=0). a, b: [N, D] of `dtype`; out: fp32 [S, D]; segments, scale as above.
cudaError_t column_sums(float* out, const void* a, const void* b, DType dtype, const int64_t* segments,
                        const float* scale, float scale_value, bool absolute, int64_t N, int64_t D, int64_t S,
                        cudaStream_t stream);

// out += sum over `dim` of weight * grad (|weight * grad| when `absolute`), products in fp32.
//   weight, grad: [R, C] of `dtype`; out: fp32 [C] (dim=0) or [R] (dim=1).
cudaError_t weight_attribution(float* out, const void* weight, const void* grad, DType dtype,
                               int dim, bool absolute, int64_t R, int64_t C, cudaStream_t stream);

// out[m] = max_r scores[r, m] (mode 0, NaN propagates) or
//          (((0 + scores[0, m]) + scores[1, m]) + ... + scores[R-1, m]) / R (mode 1), all fp32.
//   scores: fp32 [R, M]; out: fp32 [M].
cudaError_t ensemble_aggregate(float* out, const float* scores, int mode, int64_t R, int64_t M,
                               cudaStream_t stream);

// The k-th and k1-th smallest (0-based) of fp32 values[M] (finite; -0.0 == +0.0), by an exact
// three-pass radix select (11 + 11 + 10 bits). `hist` is device scratch of at least
// kOrderStatisticsHistogramWords uint64 words. Synchronizes `stream` once per pass (each pass
// copies its histogram to the host, where the bucket search runs) and writes the two results
// into out[0], out[1] (fp32, device) with an async copy on `stream`.
constexpr int64_t kOrderStatisticsHistogramWords = 2 * 2048;
cudaError_t order_statistics(float* out, const float* values, int64_t M, int64_t k, int64_t k1,
                             unsigned long long* hist, cudaStream_t stream);

// mask[l, d] = values[l, d] > threshold && (!positive_only || values[l, d] > 0);
// counts[l] = number of true elements in row l. values: fp32 [L, D]; mask: bool [L, D] (one byte
// per element, 0 or 1); counts: int64 [L] (fully written, no initialization needed).
cudaError_t threshold_mask(bool* mask, int64_t* counts, const float* values, float threshold,
                           bool positive_only, int64_t L, int64_t D, cudaStream_t stream);

// One torch.optim.AdamW step (single-tensor arithmetic, fp32) on the compact state, then the
// ensemble rows (dim 0) or columns (dim 1) of `weight` = rne(float(base) + scale * delta).
//   weight: [out, in] of `dtype`; index: int64 [K]; dim 0: grad, delta, exp_avg, exp_avg_sq fp32
//   [K, in], base [K, in] of `dtype`; dim 1: [out, K]. Only weight[index] (along dim) is written;
//   an index outside the weight is skipped (validated by the public API), and with repeated
//   indices one of the updates wins (as index_copy_).
cudaError_t ensemble_adamw_step(void* weight, DType dtype, const int64_t* index, const float* grad,
                                float* delta, float* exp_avg, float* exp_avg_sq, const void* base,
                                int64_t out_features, int64_t in_features, int64_t K, int dim,
                                int64_t step, double lr, double scale, double beta1, double beta2,
                                double eps, double weight_decay, cudaStream_t stream);

// delta[K, n] -= (delta @ basis) @ basis^T (fp32; basis [n, r], orthonormal columns), then
// weight[index[k], :] = rne(float(base[k, :]) + scale * delta[k, :]) (rows of weight [*, n] of
// `dtype`, base [K, n] of `dtype`). coef: fp32 device scratch of at least K * r floats.
cudaError_t nullspace_project(void* weight, DType dtype, const int64_t* index, float* delta, const float* basis,
                              float* coef, const void* base, int64_t K, int64_t n, int64_t r, float scale,
                              cudaStream_t stream);

}  // namespace launch
}  // namespace cuda
}  // namespace kne
