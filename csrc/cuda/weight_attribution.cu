// kne::weight_attribution_ on CUDA: out += sum over `dim` of p = weight * grad (|weight * grad| when
// `absolute`), products of the fp32-widened inputs, fp32 accumulation in registers, memory bound
// (each input element read once, 16-byte loads where the shapes and addresses allow).
//
//   dim=1  row sums     out[r] += sum_c p(r, c)      (the kernel below)
//   dim=0  column sums  out[c] += sum_r p(r, c)      (launch::column_sums of neuron_attribution.cu)
#include "common.cuh"

namespace kne {
namespace cuda {
namespace {

using detail::Packet;

constexpr int kUnroll = 4;

// ---------------------------------------------------------------------------------------------
// Row sums. Block = 256 threads = 8 warps; kWarpsPerRow warps share one row (1: a warp per row,
// for short rows; 8: the whole block per row, for long rows). Each thread accumulates V columns
// per packet with kUnroll packets in flight; warp shuffles (and shared memory across warps)
// reduce the row, which exactly one thread then adds into out[row] (no atomics: one writer).
// ---------------------------------------------------------------------------------------------
template <typename T, int V, int kWarpsPerRow>
__global__ void __launch_bounds__(256)
    row_sum_kernel(float* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b,
                   bool absolute, int64_t R, int64_t C) {
  using P = Packet<T, V>;
  constexpr int kRowsPerBlock = 8 / kWarpsPerRow;
  constexpr int kGroup = 32 * kWarpsPerRow;  // threads per row
  __shared__ float warp_part[8];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = warp / kWarpsPerRow;  // which of the block's rows
  const int t = threadIdx.x % kGroup;    // thread within the row's group
  // The loop bound is the same for the whole block (row0), so the barriers below are uniform.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; row0 < R;
       row0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = row0 + slot;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    if (row < R) {
      const T* pa = a + row * C;
      const T* pb = b + row * C;
      for (int64_t c0 = static_cast<int64_t>(t) * V; c0 < C; c0 += kGroup * V * kUnroll) {
        typename P::Raw ra[kUnroll], rb[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t c = c0 + static_cast<int64_t>(u) * kGroup * V;
          if (c < C) {
            ra[u] = P::load(pa + c);
            rb[u] = P::load(pb + c);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (c0 + static_cast<int64_t>(u) * kGroup * V < C) {
            float x[V], y[V];
            P::unpack(ra[u], x);
            P::unpack(rb[u], y);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const float p = __fmul_rn(x[j], y[j]);
              acc[j] += absolute ? fabsf(p) : p;
            }
          }
        }
      }
    }
    float s = acc[0];
#pragma unroll
    for (int j = 1; j < V; ++j) s += acc[j];
    s = detail::warp_sum(s);
    if (kWarpsPerRow == 1) {
      if (lane == 0 && row < R) out[row] += s;
    } else {
      if (lane == 0) warp_part[warp] = s;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = warp_part[0];
#pragma unroll
        for (int w = 1; w < kWarpsPerRow; ++w) total += warp_part[w];
        if (row < R) out[row] += total;
      }
      __syncthreads();
    }
  }
}

template <typename T, int V>
void launch_row_sum_v(float* out, const T* a, const T* b, bool absolute, int64_t R, int64_t C,
                      cudaStream_t stream) {
  // Long rows: a block per row; short rows: a warp per row.
  if (C >= 4096) {
    const int64_t grid = std::min<int64_t>(R, 1 << 20);
    row_sum_kernel<T, V, 8><<<static_cast<unsigned>(grid), 256, 0, stream>>>(out, a, b, absolute, R, C);
  } else {
    const int64_t grid = std::min<int64_t>(detail::ceil_div(R, 8), 1 << 20);
    row_sum_kernel<T, V, 1><<<static_cast<unsigned>(grid), 256, 0, stream>>>(out, a, b, absolute, R, C);
  }
}

template <typename T>
cudaError_t launch_row_sum(float* out, const T* a, const T* b, bool absolute, int64_t R, int64_t C,
                           cudaStream_t stream) {
  constexpr int kV = detail::kVec16<T>;
  if (C % kV == 0 && detail::aligned16(a) && detail::aligned16(b)) {
    launch_row_sum_v<T, kV>(out, a, b, absolute, R, C, stream);
  } else {
    launch_row_sum_v<T, 1>(out, a, b, absolute, R, C, stream);
  }
  return cudaGetLastError();
}

}  // namespace

namespace launch {

cudaError_t weight_attribution(float* out, const void* weight, const void* grad, DType dtype,
                               int dim, bool absolute, int64_t R, int64_t C, cudaStream_t stream) {
  if (R == 0 || C == 0) return cudaSuccess;
  if (dim == 0)  // per column: the column-sum kernel with one segment and no scale
    return column_sums(out, weight, grad, dtype, nullptr, nullptr, 1.f, absolute, R, C, 1, stream);
  return KNE_DISPATCH_DTYPE(dtype, [&] {
    return launch_row_sum<scalar_t>(out, static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(grad),
                                    absolute, R, C, stream);
  });
}

}  // namespace launch
}  // namespace cuda
}  // namespace kne
