// Ensemble selection kernels: aggregation over requests, exact order statistics (radix select),
// threshold masks with per-row counts. All fp32 in, memory bound, each input read once per pass.
#include <cstring>
#include <vector>

#include "common.cuh"

namespace kne {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// ensemble_aggregate: out[m] = max_r s[r, m]  or  (sum_{r=0..R-1} s[r, m], in order, from 0) / R.
// One thread per V consecutive outputs (coalesced 16-byte loads over m), a sequential loop over r:
// the float32 sum has exactly the order of the specification, and the division is IEEE (correctly
// rounded). (torch.mean itself matches that only for small R: on CPU, torch 2.13, for R <= 4; on
// CUDA it reduces in another order and multiplies by a float reciprocal of R.)
// Max propagates NaN (as torch.amax): a NaN anywhere in the column makes the result NaN.
// ---------------------------------------------------------------------------------------------
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&f)[V]) {
  detail::Packet<float, V>::unpack(detail::Packet<float, V>::load(p), f);
}

template <int V, bool kMean>
__global__ void __launch_bounds__(256)
    aggregate_kernel(float* __restrict__ out, const float* __restrict__ s, int64_t R, int64_t M) {
  const int64_t packets = M / V;  // V divides M
  const float rf = static_cast<float>(R);
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packets;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = p * V;
    float acc[V];
    load_f32<V>(s + m, acc);
    if (kMean) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = __fadd_rn(0.f, acc[j]);  // the sum starts at 0
    }
#pragma unroll 4
    for (int64_t r = 1; r < R; ++r) {
      float x[V];
      load_f32<V>(s + r * M + m, x);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (kMean)
          acc[j] = __fadd_rn(acc[j], x[j]);
        else
          acc[j] = (x[j] > acc[j] || isnan(x[j])) ? x[j] : acc[j];
      }
    }
    if (kMean) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = __fdiv_rn(acc[j], rf);
    }
    if constexpr (V == 4) {
      *reinterpret_cast<float4*>(out + m) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    } else {
      out[m] = acc[0];
    }
  }
}

template <int V>
void launch_aggregate_v(float* out, const float* s, int mode, int64_t R, int64_t M,
                        cudaStream_t stream) {
  const int64_t grid = std::min<int64_t>(detail::ceil_div(M / V, 256), 64LL * detail::multiprocessor_count());
  if (mode == 0)
    aggregate_kernel<V, false><<<static_cast<unsigned>(grid), 256, 0, stream>>>(out, s, R, M);
  else
    aggregate_kernel<V, true><<<static_cast<unsigned>(grid), 256, 0, stream>>>(out, s, R, M);
}

// ---------------------------------------------------------------------------------------------
// order_statistics: radix select on the order-preserving 32-bit key of a float (positives get
// the sign bit set, negatives have all bits inverted; -0.0 is first mapped to +0.0 so the two
// zeros are one value). Three passes over all values resolve the keys of both wanted ranks
// 11 + 11 + 10 bits at a time: pass p histograms digit p of the keys whose higher digits equal
// the target's prefix found so far (two histograms once the two ranks' prefixes differ). Each
// block counts in shared memory (2 x 2048 x 4 bytes), then adds its non-zero bins to the global
// uint64 histogram with atomics; the host copies the histogram back and finds the bucket that
// holds each rank (the counts before it are subtracted from the rank). Exact zeros, the one
// value that is typically very frequent (parameters without gradient), are counted in registers
// and added once per warp instead of contending for one shared counter.
// 16-bit digits (two passes) would need 65536 counters per block: 256 KiB, over the shared memory
// of a multiprocessor, hence three passes of at most 2048 bins.
// ---------------------------------------------------------------------------------------------
constexpr int kPasses = 3;
constexpr int kDigitBits[kPasses] = {11, 11, 10};
constexpr int kDigitShift[kPasses] = {21, 10, 0};
constexpr int kMaxBins = 2048;
constexpr uint32_t kZeroKey = 0x80000000u;  // the key of +0.0 (and of -0.0)
constexpr int kHistThreads = 512;
static_assert(2 * kMaxBins == launch::kOrderStatisticsHistogramWords, "histogram scratch size");

__device__ __forceinline__ uint32_t float_key(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u << 1) == 0u) u = 0u;  // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

float key_to_float(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <int V>
__global__ void __launch_bounds__(kHistThreads)
    radix_histogram_kernel(unsigned long long* __restrict__ hist, const float* __restrict__ values,
                           int64_t n, uint32_t prefix_mask, uint32_t prefix_a, uint32_t prefix_b,
                           bool two, int shift, int bins) {
  __shared__ unsigned counts[2 * kMaxBins];
  const int nbins = two ? 2 * bins : bins;
  for (int i = threadIdx.x; i < nbins; i += blockDim.x) counts[i] = 0u;
  __syncthreads();

  unsigned zeros = 0u;
  auto count = [&](float x) {
    const uint32_t key = float_key(x);
    if (key == kZeroKey) {
      ++zeros;
      return;
    }
    const uint32_t digit = (key >> shift) & static_cast<uint32_t>(bins - 1);
    const uint32_t high = key & prefix_mask;
    if (high == prefix_a)
      atomicAdd(&counts[digit], 1u);
    else if (two && high == prefix_b)
      atomicAdd(&counts[bins + digit], 1u);
  };

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packets = n / V;
  for (int64_t p = tid; p < packets; p += stride) {
    float x[V];
    load_f32<V>(values + p * V, x);
#pragma unroll
    for (int j = 0; j < V; ++j) count(x[j]);
  }
  for (int64_t i = packets * V + tid; i < n; i += stride) count(__ldg(values + i));

  zeros = __reduce_add_sync(detail::kFullMask, zeros);
  if ((threadIdx.x & 31) == 0 && zeros != 0u) {
    const uint32_t digit = (kZeroKey >> shift) & static_cast<uint32_t>(bins - 1);
    const uint32_t high = kZeroKey & prefix_mask;
    if (high == prefix_a)
      atomicAdd(&counts[digit], zeros);
    else if (two && high == prefix_b)
      atomicAdd(&counts[bins + digit], zeros);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nbins; i += blockDim.x)
    if (counts[i] != 0u) atomicAdd(hist + i, static_cast<unsigned long long>(counts[i]));
}

// ---------------------------------------------------------------------------------------------
// threshold_mask: one pass; block (row, chunk) writes mask bytes for its chunk of the row and
// adds its count of true elements to counts[row] (stored directly when a row is one chunk).
// ---------------------------------------------------------------------------------------------
template <int V>
__global__ void __launch_bounds__(256)
    threshold_mask_kernel(bool* __restrict__ mask, int64_t* __restrict__ counts,
                          const float* __restrict__ values, float threshold, bool positive_only,
                          int64_t D, int64_t chunk) {
  __shared__ unsigned warp_counts[8];
  const int64_t row = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = min(D, begin + chunk);
  const float* src = values + row * D;
  bool* dst = mask + row * D;

  unsigned c = 0u;
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end;
       i += static_cast<int64_t>(blockDim.x) * V) {
    float x[V];
    load_f32<V>(src + i, x);
    uint32_t bytes = 0u;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const bool keep = x[j] > threshold && (!positive_only || x[j] > 0.f);
      c += keep;
      bytes |= static_cast<uint32_t>(keep) << (8 * j);
    }
    if constexpr (V == 4)
      *reinterpret_cast<uint32_t*>(dst + i) = bytes;  // 4 mask bytes at once (4-byte aligned)
    else
      dst[i] = bytes != 0u;
  }
  c = __reduce_add_sync(detail::kFullMask, c);
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) warp_counts[warp] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_counts[w];
    if (gridDim.y == 1)
      counts[row] = static_cast<int64_t>(total);
    else
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + row), total);
  }
}

}  // namespace

namespace launch {

cudaError_t ensemble_aggregate(float* out, const float* scores, int mode, int64_t R, int64_t M,
                               cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (M % 4 == 0 && detail::aligned16(out) && detail::aligned16(scores))
    launch_aggregate_v<4>(out, scores, mode, R, M, stream);
  else
    launch_aggregate_v<1>(out, scores, mode, R, M, stream);
  return cudaGetLastError();
}

cudaError_t order_statistics(float* out, const float* values, int64_t M, int64_t k, int64_t k1,
                             unsigned long long* hist, cudaStream_t stream) {
  struct Target {
    uint32_t prefix;  // the key's digits found so far
    int64_t rank;     // rank within the keys that share `prefix`
  };
  Target target[2] = {{0u, k}, {0u, k1}};
  uint32_t mask = 0u;  // the bits of the key that `prefix` holds
  std::vector<unsigned long long> host(2 * kMaxBins);

  const bool vec = detail::aligned16(values);
  const int64_t work = detail::ceil_div(M, kHistThreads * (vec ? 4 : 1));
  // 4 blocks of 512 threads fill a multiprocessor; a block counts < 2^32 elements in uint32.
  const int64_t grid = std::max<int64_t>(std::min<int64_t>(work, 4LL * detail::multiprocessor_count()),
                                         detail::ceil_div(M, int64_t(1) << 31));

  for (int pass = 0; pass < kPasses; ++pass) {
    const int bins = 1 << kDigitBits[pass];
    const int shift = kDigitShift[pass];
    const bool two = target[0].prefix != target[1].prefix;
    const int nbins = two ? 2 * bins : bins;
    cudaError_t err = cudaMemsetAsync(hist, 0, sizeof(unsigned long long) * nbins, stream);
    if (err != cudaSuccess) return err;
    if (vec)
      radix_histogram_kernel<4><<<static_cast<unsigned>(grid), kHistThreads, 0, stream>>>(
          hist, values, M, mask, target[0].prefix, target[1].prefix, two, shift, bins);
    else
      radix_histogram_kernel<1><<<static_cast<unsigned>(grid), kHistThreads, 0, stream>>>(
          hist, values, M, mask, target[0].prefix, target[1].prefix, two, shift, bins);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    err = cudaMemcpyAsync(host.data(), hist, sizeof(unsigned long long) * nbins,
                          cudaMemcpyDeviceToHost, stream);
    if (err != cudaSuccess) return err;
    if ((err = cudaStreamSynchronize(stream)) != cudaSuccess) return err;

    for (int t = 0; t < 2; ++t) {
      const unsigned long long* h = host.data() + (two && t == 1 ? bins : 0);
      int64_t below = 0;
      int digit = 0;
      // The bucket holding the rank: the first whose cumulative count exceeds it. The bucket's
      // count is > rank by construction (the rank was within the previous bucket), so the search
      // stops before the last bin unless the rank lies there.
      while (digit < bins - 1 && below + static_cast<int64_t>(h[digit]) <= target[t].rank)
        below += static_cast<int64_t>(h[digit++]);
      target[t].prefix |= static_cast<uint32_t>(digit) << shift;
      target[t].rank -= below;
    }
    mask |= static_cast<uint32_t>(bins - 1) << shift;
  }

  const float result[2] = {key_to_float(target[0].prefix), key_to_float(target[1].prefix)};
  // From pageable memory: returns once `result` is staged, so the local may go out of scope.
  return cudaMemcpyAsync(out, result, sizeof result, cudaMemcpyHostToDevice, stream);
}

cudaError_t threshold_mask(bool* mask, int64_t* counts, const float* values, float threshold,
                           bool positive_only, int64_t L, int64_t D, cudaStream_t stream) {
  if (L == 0) return cudaSuccess;
  if (D == 0) return cudaMemsetAsync(counts, 0, sizeof(int64_t) * L, stream);
  const bool vec = D % 4 == 0 && detail::aligned16(values) && (reinterpret_cast<uintptr_t>(mask) & 3u) == 0;
  const int v = vec ? 4 : 1;
  const int threads = static_cast<int>(std::min<int64_t>(256, detail::ceil_div(detail::ceil_div(D, v), 32) * 32));
  // Chunks of at least 4 packets per thread; enough chunks per row to fill the GPU twice over
  // when there are few rows; at most 65535 (the grid's y limit).
  const int64_t per_block_min = int64_t(threads) * v * 4;
  const int64_t want = std::max<int64_t>(1, detail::ceil_div(16LL * detail::multiprocessor_count(), L));
  int64_t chunks = std::min<int64_t>({want, detail::ceil_div(D, per_block_min), 65535});
  int64_t chunk = detail::ceil_div(detail::ceil_div(D, chunks), int64_t(threads) * v) * (int64_t(threads) * v);
  chunks = detail::ceil_div(D, chunk);
  if (chunks > 1) {
    const cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int64_t) * L, stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(L), static_cast<unsigned>(chunks));
  if (vec)
    threshold_mask_kernel<4><<<grid, threads, 0, stream>>>(mask, counts, values, threshold, positive_only, D, chunk);
  else
    threshold_mask_kernel<1><<<grid, threads, 0, stream>>>(mask, counts, values, threshold, positive_only, D, chunk);
  return cudaGetLastError();
}

}  // namespace launch
}  // namespace cuda
}  // namespace kne
