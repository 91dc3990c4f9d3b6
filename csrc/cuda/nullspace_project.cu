// Null-space projection of a compact row delta (kne::nullspace_project_), then the ensemble rows of
// the weight rewritten:
//
//   coef[k, j]  = sum_i delta[k, i] * basis[i, j]                (fp32, tiled, i ascending per tile)
//   delta[k, i] = delta[k, i] - sum_j coef[k, j] * basis[i, j]
//   weight[index[k], i] = rne(float(base[k, i]) + scale * delta[k, i])
//
// Two launches of a plain 16x16 shared-memory tiled product (the delta has few rows: K is the
// ensemble size of one module instance); `coef` is fp32 scratch [K, r] from the caller.
#include "common.cuh"

namespace kne {
namespace cuda {
namespace {

constexpr int kTile = 16;

// coef[K, r] = delta[K, n] @ basis[n, r]
__global__ void __launch_bounds__(kTile * kTile)
    coef_kernel(const float* __restrict__ delta, const float* __restrict__ basis, float* __restrict__ coef,
                int64_t K, int64_t n, int64_t r) {
  __shared__ float sd[kTile][kTile + 1];
  __shared__ float sb[kTile][kTile + 1];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  float acc = 0.0f;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t di = i0 + threadIdx.x;  // delta tile: row k, column di
    sd[threadIdx.y][threadIdx.x] = (k < K && di < n) ? delta[k * n + di] : 0.0f;
    const int64_t bi = i0 + threadIdx.y;  // basis tile: row bi, column j
    sb[threadIdx.y][threadIdx.x] = (bi < n && j < r) ? basis[bi * r + j] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc = __fmaf_rn(sd[threadIdx.y][t], sb[t][threadIdx.x], acc);
    __syncthreads();
  }
  if (k < K && j < r) coef[k * r + j] = acc;
}

// delta[K, n] -= coef[K, r] @ basis[n, r]^T; weight[index[k]] = rne(base + scale * delta)
template <typename W>
__global__ void __launch_bounds__(kTile * kTile)
    project_kernel(W* __restrict__ weight, const int64_t* __restrict__ index, float* __restrict__ delta,
                   const float* __restrict__ basis, const float* __restrict__ coef, const W* __restrict__ base,
                   int64_t K, int64_t n, int64_t r, float scale) {
  __shared__ float sc[kTile][kTile + 1];
  __shared__ float sb[kTile][kTile + 1];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  float acc = 0.0f;
  for (int64_t j0 = 0; j0 < r; j0 += kTile) {
    const int64_t cj = j0 + threadIdx.x;  // coef tile: row k, column cj
    sc[threadIdx.y][threadIdx.x] = (k < K && cj < r) ? coef[k * r + cj] : 0.0f;
    const int64_t bi = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;  // basis row bi, column j0+x
    sb[threadIdx.y][threadIdx.x] = (bi < n && j0 + threadIdx.x < r) ? basis[bi * r + j0 + threadIdx.x] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc = __fmaf_rn(sc[threadIdx.y][t], sb[threadIdx.x][t], acc);
    __syncthreads();
  }
  if (k < K && i < n) {
    const int64_t e = k * n + i;
    const float d = __fsub_rn(delta[e], acc);
    delta[e] = d;
    weight[index[k] * n + i] = detail::from_float<W>(__fadd_rn(detail::to_float(base[e]), __fmul_rn(scale, d)));
  }
}

}  // namespace

namespace launch {

cudaError_t nullspace_project(void* weight, DType dtype, const int64_t* index, float* delta, const float* basis,
                              float* coef, const void* base, int64_t K, int64_t n, int64_t r, float scale,
                              cudaStream_t stream) {
  if (K == 0 || n == 0) return cudaSuccess;
  const dim3 block(kTile, kTile);
  if (r > 0) {
    const dim3 grid(static_cast<unsigned>(detail::ceil_div(K, kTile)), static_cast<unsigned>(detail::ceil_div(r, kTile)));
    coef_kernel<<<grid, block, 0, stream>>>(delta, basis, coef, K, n, r);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(K, kTile)), static_cast<unsigned>(detail::ceil_div(n, kTile)));
  KNE_DISPATCH_DTYPE(dtype, [&] {
    project_kernel<scalar_t><<<grid, block, 0, stream>>>(static_cast<scalar_t*>(weight), index, delta, basis, coef,
                                                         static_cast<const scalar_t*>(base), K, n, r, scale);
  });
  return cudaGetLastError();
}

}  // namespace launch
}  // namespace cuda
}  // namespace kne
