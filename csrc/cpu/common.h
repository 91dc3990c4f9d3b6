// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): argument checks with messages that name the
// argument and the fix, element loads/stores of fp32/fp16/bf16 as float32 that the compiler
// vectorises, the function-multiversioning macro, and the internal column reduction shared by
// neuron_attribution_ and weight_attribution_(dim=0).
//
// Vectorisation stays portable: the library is built with plain -O3 (no -march), so hot loops are
// plain C++ loops (restrict pointers, `#pragma omp simd`, float accumulators) that GCC compiles
// once per target through KNE_CLONES (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA+F16C, and the
// baseline), picked at load time by the dynamic loader (ifunc). Elsewhere KNE_CLONES is empty and
// the baseline build of the same loops runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__) && !defined(KNE_NO_CLONES)
#define KNE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KNE_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define KNE_RESTRICT __restrict__
#define KNE_INLINE inline __attribute__((always_inline))
#else
#define KNE_RESTRICT
#define KNE_INLINE inline
#endif

#define KNE_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
#define KNE_SIMD KNE_PRAGMA(omp simd)
#define KNE_SIMD_SUM(var) KNE_PRAGMA(omp simd reduction(+ : var))
#define KNE_SIMD_MAXMIN(hi, lo) KNE_PRAGMA(omp simd reduction(max : hi) reduction(min : lo))
#define KNE_SIMD_SUM2(a, b) KNE_PRAGMA(omp simd reduction(+ : a, b))
#else
#define KNE_SIMD
#define KNE_SIMD_SUM(var)
#define KNE_SIMD_MAXMIN(hi, lo)
#define KNE_SIMD_SUM2(a, b)
#endif

namespace kne {
namespace cpu {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Bit casts that vectorise (memcpy inside `omp simd` loops upsets GCC 12's stringop warnings).
KNE_INLINE float f32_from_bits(uint32_t u) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
KNE_INLINE uint32_t bits_from_f32(float f) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint32_t, f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// Element types, each with its storage type and an exact, branch-free load as float32.
struct F32 {
  using storage = float;
  static constexpr at::ScalarType dtype = at::kFloat;
  static KNE_INLINE float load(float x) { return x; }
};
struct BF16 {  // bfloat16 is the top half of a float32: the shift is exact
  using storage = uint16_t;
  static constexpr at::ScalarType dtype = at::kBFloat16;
  static KNE_INLINE float load(uint16_t x) { return f32_from_bits(uint32_t(x) << 16); }
};
struct F16 {  // IEEE half -> float, exact (normals, subnormals, inf, nan), select-only
  using storage = uint16_t;
  static constexpr at::ScalarType dtype = at::kHalf;
  static KNE_INLINE float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    // normals (and inf/nan): move exponent/mantissa into place with an exponent offset of 0xE0,
    // then scale by 2^-112 (inf/nan survive the multiplication)
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(15u << 23);
    // subnormals and zero: build 0.5 + m * 2^-24 and subtract 0.5
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t denormal_mask = 0u - uint32_t(two_w < (1u << 27));  // all ones for subnormals/zero
    const uint32_t r = sign | (bits_from_f32(denormalized) & denormal_mask) | (bits_from_f32(normalized) & ~denormal_mask);
    return f32_from_bits(r);
  }
};

// float32 -> bfloat16 bits, round to nearest even (torch's c10::BFloat16 rounding; NaN -> 0x7FC0).
KNE_INLINE uint16_t bf16_from_f32(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(nan ? 0x7FC0u : rounded);
}

// float32 -> IEEE half bits, round to nearest even (the algorithm of c10's fp16_ieee_from_fp32_value,
// select-only so that it vectorises; NaN -> 0x7E00).
KNE_INLINE uint16_t f16_from_f32(float f) {
  const float scale_to_inf = f32_from_bits(0x77800000u);   // 2^112
  const float scale_to_zero = f32_from_bits(0x08800000u);  // 2^-110
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const float abs_f = f32_from_bits(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_f32(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <typename E>
KNE_INLINE typename E::storage store_as(float f);
template <>
KNE_INLINE float store_as<F32>(float f) { return f; }
template <>
KNE_INLINE uint16_t store_as<BF16>(float f) { return bf16_from_f32(f); }
template <>
KNE_INLINE uint16_t store_as<F16>(float f) { return f16_from_f32(f); }

// Calls fn(E{}) with E the element type of `dtype` (fp32, bf16, fp16).
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(F32{});
      break;
    case at::kBFloat16:
      fn(BF16{});
      break;
    case at::kHalf:
      fn(F16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

template <typename E>
KNE_INLINE const typename E::storage* data_of(const at::Tensor& t) {
  return static_cast<const typename E::storage*>(t.const_data_ptr());
}
template <typename E>
KNE_INLINE typename E::storage* mutable_data_of(at::Tensor& t) {
  return static_cast<typename E::storage*>(t.mutable_data_ptr());
}

// ---------------------------------------------------------------------------------------------
// Argument checks. Every message names the op, the argument, what was wrong and the fix.
inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (auto d : dtypes) {
    if (!s.empty()) s += ", ";
    s += c10::toString(d);
  }
  return s;
}

inline void check_tensor(const at::Tensor& t, const char* op, const char* name,
                         std::initializer_list<at::ScalarType> dtypes, int64_t dim = -1) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              "; the CPU kernels take CPU tensors only (move every argument with .cpu(), or use the ",
              "kernels of that device)");
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  TORCH_CHECK(ok, op, ": ", name, " has dtype ", t.scalar_type(), "; expected ", dtype_list(dtypes),
              " (cast it with .to())");
  if (dim >= 0) {
    TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " is not contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); pass ", name, ".contiguous()");
}

inline void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef want,
                        const char* what) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, " (", what, "), got ",
              t.sizes());
}

// `written` (an argument the op writes in place) shares no memory with `other`: aliased arguments
// would be read after being written (the public functions of kne_kernels refuse them first, for
// every backend).
inline void check_no_overlap(const at::Tensor& written, const char* wname, const at::Tensor& other, const char* oname,
                             const char* op) {
  if (written.numel() == 0 || other.numel() == 0) return;
  TORCH_CHECK(at::get_overlap_status(written, other) == at::MemOverlapStatus::No, op, ": ", wname, " and ", oname,
              " share memory; ", op, " writes ", wname, " in place, so it must not alias another argument (pass ",
              oname, ".clone())");
}

// Ids in [0, limit) for every element of the int64 tensor `ids` (one parallel scan).
void check_ids_in_range(const at::Tensor& ids, int64_t limit, const char* op, const char* name,
                        const char* limit_name);

// ---------------------------------------------------------------------------------------------
// out[seg[n], d] += sum_n w(n) * f(a[n, d] * b[n, d]) over the rows n, with w(n) = scale[n] *
// scale_value (scale may be null; segments null means S == 1) and f = abs when `absolute`.
// a, b: contiguous [N, D] of one float dtype; out: contiguous fp32 [S, D]. Float32 accumulation
// in row chunks of fixed size (the result does not depend on the number of threads).
void column_reduce(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const int64_t* segments,
                   const float* scale, float scale_value, bool absolute);

// order_statistics through its radix select only (the op takes a faster one-pass path first and
// falls back to the radix select; the C++ tests call this to test the radix select on every input).
at::Tensor order_statistics_radix(const at::Tensor& values, int64_t k);

}  // namespace detail
}  // namespace cpu
}  // namespace kne
