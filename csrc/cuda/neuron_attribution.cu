// kne::neuron_attribution_ on CUDA: column sums (memory bound: each input element is read once,
// 16-byte loads where the shapes and addresses allow, fp32 accumulation in registers):
//
//   out[seg[n], d] += sum_n p(n, d)
//
// with p = a * b (products of the fp32-widened inputs), |a * b| when `absolute`, times scale[n] and
// scale_value when given (in that order, as the torch kernel: ((a * b) * scale[n]) * scale_value).
// The same kernel serves weight_attribution_ with dim=0 (launch::column_sums; its row sums are in
// weight_attribution.cu).
#include "common.cuh"

namespace kne {
namespace cuda {
namespace {

using detail::Packet;

// ---------------------------------------------------------------------------------------------
// Column sums. Block = 32 x 8 threads; the block owns 32 * V consecutive columns and a tile of
// `rows_per_block` rows. Thread (tx, ty) accumulates columns [col, col + V), col = (bx * 32 + tx)
// * V, over rows row_begin + ty + 8 i, kUnroll rows in flight. A thread's accumulator belongs to
// one segment; when the segment id changes from one of its rows to the next, it is flushed to
// `out` with atomics (so any segment order is correct; sorted ids, the usual case, flush rarely).
// When every row of the tile is in one segment (always without `seg`), the 8 row-threads of a
// column are first summed in shared memory: one atomicAdd per column and tile.
// ---------------------------------------------------------------------------------------------
constexpr int kColThreads = 32;
constexpr int kRowThreads = 8;
constexpr int kUnroll = 4;

template <typename T, int V>
__global__ void __launch_bounds__(kColThreads* kRowThreads)
    column_sum_kernel(float* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b,
                      const int64_t* __restrict__ seg, const float* __restrict__ scale,
                      float scale_value, bool use_scale_value, bool absolute, int64_t N, int64_t D,
                      int64_t S, int64_t rows_per_block) {
  using P = Packet<T, V>;
  __shared__ float partial[kRowThreads][V][kColThreads];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kColThreads + tx) * V;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = min(N, row_begin + rows_per_block);
  const int64_t first_seg = seg ? __ldg(seg + row_begin) : 0;

  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  int64_t cur = -1;    // segment of `acc`; -1 while the thread has seen no row
  bool mixed = false;  // the thread has flushed a segment already

  auto flush = [&](int64_t s) {
    if (static_cast<uint64_t>(s) >= static_cast<uint64_t>(S)) return;  // invalid id: skipped
    float* dst = out + s * D + col;
#pragma unroll
    for (int j = 0; j < V; ++j) atomicAdd(dst + j, acc[j]);
  };

  if (col < D) {  // V divides D on the vector path, so the whole packet is in range
    for (int64_t r0 = row_begin + ty; r0 < row_end; r0 += kRowThreads * kUnroll) {
      typename P::Raw ra[kUnroll], rb[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t r = r0 + u * kRowThreads;
        if (r < row_end) {
          ra[u] = P::load(a + r * D + col);
          rb[u] = P::load(b + r * D + col);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t r = r0 + u * kRowThreads;
        if (r < row_end) {
          const int64_t s = seg ? __ldg(seg + r) : 0;
          if (s != cur) {
            if (cur >= 0) {
              flush(cur);
              mixed = true;
#pragma unroll
              for (int j = 0; j < V; ++j) acc[j] = 0.f;
            }
            cur = s;
          }
          const float f = scale ? __ldg(scale + r) : 1.f;
          float x[V], y[V];
          P::unpack(ra[u], x);
          P::unpack(rb[u], y);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            float p = __fmul_rn(x[j], y[j]);
            if (absolute) p = fabsf(p);
            if (scale) p = __fmul_rn(p, f);
            if (use_scale_value) p = __fmul_rn(p, scale_value);
            acc[j] += p;
          }
        }
      }
    }
  }

  // Block-uniform decision (every thread reaches this barrier).
  const bool one_segment = __syncthreads_and(!mixed && (cur < 0 || cur == first_seg));
  if (one_segment) {
#pragma unroll
    for (int j = 0; j < V; ++j) partial[ty][j][tx] = acc[j];
    __syncthreads();
    if (ty == 0 && col < D) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float t = partial[0][j][tx];
#pragma unroll
        for (int i = 1; i < kRowThreads; ++i) t += partial[i][j][tx];
        acc[j] = t;
      }
      flush(first_seg);
    }
  } else if (cur >= 0) {
    flush(cur);
  }
}

template <typename T>
cudaError_t launch_column_sum(float* out, const T* a, const T* b, const int64_t* seg,
                              const float* scale, float scale_value, bool absolute, int64_t N,
                              int64_t D, int64_t S, cudaStream_t stream) {
  constexpr int kV = detail::kVec16<T>;
  const bool vec = D % kV == 0 && detail::aligned16(a) && detail::aligned16(b);
  const int v = vec ? kV : 1;
  const int64_t grid_x = detail::ceil_div(D, kColThreads * v);
  // Enough row tiles to fill the GPU about twice over, but at least 64 rows per tile (to
  // amortize the per-tile atomics) and at most 65535 tiles (the grid's y limit).
  const int64_t target_blocks = 16LL * detail::multiprocessor_count();
  const int64_t tiles = std::max<int64_t>(1, detail::ceil_div(target_blocks, grid_x));
  int64_t rows = std::max<int64_t>({detail::ceil_div(N, tiles), 64, detail::ceil_div(N, 65535)});
  rows = detail::ceil_div(rows, kRowThreads * kUnroll) * (kRowThreads * kUnroll);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(detail::ceil_div(N, rows)));
  const dim3 block(kColThreads, kRowThreads);
  const bool use_sv = scale_value != 1.f;
  if (vec) {
    column_sum_kernel<T, kV><<<grid, block, 0, stream>>>(out, a, b, seg, scale, scale_value, use_sv,
                                                        absolute, N, D, S, rows);
  } else {
    column_sum_kernel<T, 1><<<grid, block, 0, stream>>>(out, a, b, seg, scale, scale_value, use_sv,
                                                       absolute, N, D, S, rows);
  }
  return cudaGetLastError();
}

}  // namespace

namespace launch {

cudaError_t column_sums(float* out, const void* a, const void* b, DType dtype, const int64_t* segments,
                        const float* scale, float scale_value, bool absolute, int64_t N, int64_t D, int64_t S,
                        cudaStream_t stream) {
  if (N == 0 || D == 0 || S == 0) return cudaSuccess;
  return KNE_DISPATCH_DTYPE(dtype, [&] {
    return launch_column_sum<scalar_t>(out, static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b),
                                       segments, scale, scale_value, absolute, N, D, S, stream);
  });
}

cudaError_t neuron_attribution(float* out, const void* act, const void* grad, DType dtype,
                               const int64_t* segments, const float* scale, float scale_value,
                               int64_t N, int64_t D, int64_t S, cudaStream_t stream) {
  return column_sums(out, act, grad, dtype, segments, scale, scale_value, /*absolute=*/false, N, D, S, stream);
}

}  // namespace launch
}  // namespace cuda
}  // namespace kne
