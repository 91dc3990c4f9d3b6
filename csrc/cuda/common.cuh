// Device helpers shared by the kne .cu files: element conversion, 16-byte vector loads unpacked to
// fp32, warp reductions, launch-shape helpers. CUDA headers only (no ATen: keeps nvcc fast).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launchers.h"

namespace kne {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element types: conversion to fp32 (exact) and from fp32 (round to nearest even).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The two 16-bit halves of a 32-bit word, as fp32 (exact).
__device__ __forceinline__ float lo_to_float(uint32_t w, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float hi_to_float(uint32_t w, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ float lo_to_float(uint32_t w, __nv_bfloat16) {
  return __uint_as_float(w << 16);  // bf16 is the top half of an fp32
}
__device__ __forceinline__ float hi_to_float(uint32_t w, __nv_bfloat16) {
  return __uint_as_float(w & 0xffff0000u);
}

// A packet of V consecutive elements of T: loaded with one instruction through the read-only
// cache (16 bytes when V * sizeof(T) == 16, then the address must be 16-byte aligned), kept packed
// in registers (`Raw`) until it is widened to fp32 by `unpack`.
template <typename T, int V>
struct Packet;
template <typename T>
struct Packet<T, 1> {
  using Raw = T;
  __device__ __forceinline__ static Raw load(const T* p) { return __ldg(p); }
  __device__ __forceinline__ static void unpack(const Raw& r, float (&f)[1]) { f[0] = to_float(r); }
};
template <>
struct Packet<float, 4> {
  using Raw = float4;
  __device__ __forceinline__ static Raw load(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
  }
  __device__ __forceinline__ static void unpack(const Raw& r, float (&f)[4]) {
    f[0] = r.x, f[1] = r.y, f[2] = r.z, f[3] = r.w;
  }
};
template <typename T>
struct HalfPacket8 {  // 8 fp16 or bf16 elements in one uint4
  using Raw = uint4;
  __device__ __forceinline__ static Raw load(const T* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
  __device__ __forceinline__ static void unpack(const Raw& r, float (&f)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = lo_to_float(w[i], T());
      f[2 * i + 1] = hi_to_float(w[i], T());
    }
  }
};
template <>
struct Packet<__half, 8> : HalfPacket8<__half> {};
template <>
struct Packet<__nv_bfloat16, 8> : HalfPacket8<__nv_bfloat16> {};

// Elements per 16-byte packet.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessor count of the current device (cached per device; used to size grids).
inline int multiprocessor_count() {
  static int cache[128] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 128) return 108;
  if (cache[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
      sms = 108;
    cache[dev] = sms;
  }
  return cache[dev];
}

}  // namespace detail
}  // namespace cuda
}  // namespace kne

// Dispatch a launch over the element type: defines `scalar_t` inside the body.
#define KNE_DISPATCH_DTYPE(dtype, ...)                                    \
  [&] {                                                                   \
    switch (dtype) {                                                      \
      case ::kne::cuda::launch::DType::kFloat16: {                        \
        using scalar_t = __half;                                          \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::kne::cuda::launch::DType::kBFloat16: {                       \
        using scalar_t = __nv_bfloat16;                                   \
        return __VA_ARGS__();                                             \
      }                                                                   \
      default: {                                                          \
        using scalar_t = float;                                           \
        return __VA_ARGS__();                                             \
      }                                                                   \
    }                                                                     \
  }()
