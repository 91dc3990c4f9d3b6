// kne::ensemble_adamw_step_ on CPU: one torch.optim.AdamW step (single-tensor arithmetic) on the
// compact fp32 delta and its moments, fused with the write of the ensemble rows (dim=0) or columns
// (dim=1) of the weight, in one pass per element:
//
//   delta *= 1 - lr * wd                                  (when wd != 0)
//   exp_avg.lerp_(grad, 1 - beta1)                        (ATen's vector lerp: an FMA)
//   exp_avg_sq = fma((1 - beta2) * grad, grad, exp_avg_sq * beta2)    (ATen's addcmul, contracted)
//   denom = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps
//   delta += (-(lr / (1 - beta1^step)) * exp_avg) / denom
//   weight[index] = (base + scale * delta).to(weight.dtype)   (round to nearest even)
//
// Every operation is rounded in float32 in torch's order (the Python scalars are rounded to
// float32 first, as ATen does), and fused where ATen's compiled kernels are: lerp's vector form
// is an explicit FMA, and GCC contracts addcmul's `self + value * t1 * t2` into one (checked
// against torch 2.13 on x86-64). What is bit-exact (measured on x86-64 AVX-512, torch 2.13): the
// moments equal torch.optim.AdamW's default (single-tensor / foreach) CPU step, and delta equals
// torch.optim.AdamW(fused=True); against the default step delta differs on some elements (about
// 14% of a first step from zero state, by at most 2 ulp; 3-5% of later ones, by at most 4 ulp of
// max(|delta before|, |update|)),
// because ATen's vectorised float32 sqrt (MKL VML / Sleef) is not correctly rounded and this
// kernel's sqrt is. ATen's scalar tails evaluate lerp without the FMA and may differ there in the
// last bit. Contraction is otherwise switched off in this file (GCC), so that exactly those two
// products are fused. x86-64 with AVX2+FMA+F16C runs an
// intrinsics loop (sqrt does not auto-vectorise under -fmath-errno); elsewhere a scalar loop
// computes the same values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KNE_ADAMW_AVX2 1
#include <immintrin.h>
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace kne {
namespace cpu {

namespace {

struct AdamParams {
  bool has_decay;
  float decay;      // 1 - lr * weight_decay
  bool lerp_small;  // |1 - beta1| < 0.5
  float lerp_w;     // 1 - beta1
  float lerp_w1;    // (1 - beta1) - 1, in float32 as ATen computes it
  float beta2;
  float one_minus_beta2;
  float neg_step;   // -(lr / (1 - beta1^step))
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
  float scale;
};

// One element: updates d, m, v in place and returns base + scale * d (float32).
KNE_INLINE float adam_one(float g, float& d, float& m, float& v, float base, const AdamParams& p) {
  if (p.has_decay) d = d * p.decay;
  const float diff = g - m;
  m = p.lerp_small ? std::fma(p.lerp_w, diff, m) : std::fma(p.lerp_w1, diff, g);
  v = v * p.beta2;
  const float cg = p.one_minus_beta2 * g;
  v = std::fma(cg, g, v);
  const float den = std::sqrt(v) / p.bc2_sqrt + p.eps;
  const float num = p.neg_step * m;
  d = d + num / den;
  const float sd = p.scale * d;
  return base + sd;
}

template <typename E>
void adam_span_scalar(int64_t n, const float* g, float* d, float* m, float* v, const typename E::storage* base,
                      typename E::storage* out, const AdamParams& p) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = detail::store_as<E>(adam_one(g[i], d[i], m[i], v[i], E::load(base[i]), p));
  }
}

#ifdef KNE_ADAMW_AVX2
#define KNE_AVX2 __attribute__((target("avx2,fma,f16c")))

template <typename E>
KNE_AVX2 KNE_INLINE __m256 load8(const typename E::storage* p);
template <>
KNE_AVX2 KNE_INLINE __m256 load8<detail::F32>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
KNE_AVX2 KNE_INLINE __m256 load8<detail::BF16>(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
template <>
KNE_AVX2 KNE_INLINE __m256 load8<detail::F16>(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename E>
KNE_AVX2 KNE_INLINE void store8(typename E::storage* p, __m256 x);
template <>
KNE_AVX2 KNE_INLINE void store8<detail::F32>(float* p, __m256 x) {
  _mm256_storeu_ps(p, x);
}
template <>
KNE_AVX2 KNE_INLINE void store8<detail::BF16>(uint16_t* p, __m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
template <>
KNE_AVX2 KNE_INLINE void store8<detail::F16>(uint16_t* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename E>
KNE_AVX2 void adam_span_avx2(int64_t n, const float* g, float* d, float* m, float* v,
                             const typename E::storage* base, typename E::storage* out, const AdamParams& p) {
  const __m256 decay = _mm256_set1_ps(p.decay), lerp_w = _mm256_set1_ps(p.lerp_w),
               lerp_w1 = _mm256_set1_ps(p.lerp_w1), beta2 = _mm256_set1_ps(p.beta2),
               omb2 = _mm256_set1_ps(p.one_minus_beta2), neg_step = _mm256_set1_ps(p.neg_step),
               bc2 = _mm256_set1_ps(p.bc2_sqrt), eps = _mm256_set1_ps(p.eps), scale = _mm256_set1_ps(p.scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 G = _mm256_loadu_ps(g + i);
    __m256 D = _mm256_loadu_ps(d + i);
    __m256 Mv = _mm256_loadu_ps(m + i);
    __m256 V = _mm256_loadu_ps(v + i);
    if (p.has_decay) D = _mm256_mul_ps(D, decay);
    const __m256 diff = _mm256_sub_ps(G, Mv);
    Mv = p.lerp_small ? _mm256_fmadd_ps(lerp_w, diff, Mv) : _mm256_fmadd_ps(lerp_w1, diff, G);
    V = _mm256_mul_ps(V, beta2);
    V = _mm256_fmadd_ps(_mm256_mul_ps(omb2, G), G, V);
    const __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(V), bc2), eps);
    D = _mm256_add_ps(D, _mm256_div_ps(_mm256_mul_ps(neg_step, Mv), den));
    _mm256_storeu_ps(d + i, D);
    _mm256_storeu_ps(m + i, Mv);
    _mm256_storeu_ps(v + i, V);
    store8<E>(out + i, _mm256_add_ps(load8<E>(base + i), _mm256_mul_ps(scale, D)));
  }
  for (; i < n; ++i) {
    out[i] = detail::store_as<E>(adam_one(g[i], d[i], m[i], v[i], E::load(base[i]), p));
  }
}

bool cpu_has_avx2_fma_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif  // KNE_ADAMW_AVX2

template <typename E>
void adam_span(int64_t n, const float* g, float* d, float* m, float* v, const typename E::storage* base,
               typename E::storage* out, const AdamParams& p) {
#ifdef KNE_ADAMW_AVX2
  if (cpu_has_avx2_fma_f16c()) {
    adam_span_avx2<E>(n, g, d, m, v, base, out, p);
    return;
  }
#endif
  adam_span_scalar<E>(n, g, d, m, v, base, out, p);
}

template <typename E>
void run(at::Tensor& weight, const at::Tensor& index, const at::Tensor& grad, at::Tensor& delta, at::Tensor& exp_avg,
         at::Tensor& exp_avg_sq, const at::Tensor& base, int64_t dim, const AdamParams& p) {
  using S = typename E::storage;
  const int64_t O = weight.size(0), I = weight.size(1), K = index.numel();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const float* g = grad.const_data_ptr<float>();
  float* d = delta.mutable_data_ptr<float>();
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  const S* b = detail::data_of<E>(base);
  S* w = detail::mutable_data_of<E>(weight);
  if (dim == 0) {  // compact rows [K, I] -> weight rows idx[k]
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1));
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t off = k * I;
        adam_span<E>(I, g + off, d + off, m + off, v + off, b + off, w + idx[k] * I, p);
      }
    });
    return;
  }
  // compact columns [O, K] -> weight[r, idx[j]]: each row through a small buffer, then scattered
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, O, grain, [&](int64_t r0, int64_t r1) {
    constexpr int64_t B = 1024;
    S buf[B];
    for (int64_t r = r0; r < r1; ++r) {
      S* wr = w + r * I;
      for (int64_t j0 = 0; j0 < K; j0 += B) {
        const int64_t n = std::min(B, K - j0), off = r * K + j0;
        adam_span<E>(n, g + off, d + off, m + off, v + off, b + off, buf, p);
        for (int64_t j = 0; j < n; ++j) wr[idx[j0 + j]] = buf[j];
      }
    }
  });
}

}  // namespace

void ensemble_adamw_step_(at::Tensor& weight, const at::Tensor& index, const at::Tensor& grad, at::Tensor& delta,
                          at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& base, int64_t step, double lr,
                          double scale, int64_t dim, double beta1, double beta2, double eps, double weight_decay) {
  constexpr const char* op = "kne::ensemble_adamw_step_";
  using detail::check_tensor;
  check_tensor(weight, op, "weight", {at::kFloat, at::kHalf, at::kBFloat16}, 2);
  check_tensor(index, op, "index", {at::kLong}, 1);
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim must be 0 (ensemble rows) or 1 (ensemble columns), got ", dim);
  const int64_t O = weight.size(0), I = weight.size(1), K = index.numel();
  const std::vector<int64_t> compact = dim == 0 ? std::vector<int64_t>{K, I} : std::vector<int64_t>{O, K};
  const char* what = dim == 0 ? "the compact rows [K, weight.shape[1]] for dim=0, K = index.numel()"
                              : "the compact columns [weight.shape[0], K] for dim=1, K = index.numel()";
  for (const auto& nt : {std::make_pair("grad", &grad), std::make_pair("delta", static_cast<const at::Tensor*>(&delta)),
                         std::make_pair("exp_avg", static_cast<const at::Tensor*>(&exp_avg)),
                         std::make_pair("exp_avg_sq", static_cast<const at::Tensor*>(&exp_avg_sq))}) {
    check_tensor(*nt.second, op, nt.first, {at::kFloat}, 2);
    detail::check_shape(*nt.second, op, nt.first, compact, what);
  }
  check_tensor(base, op, "base", {weight.scalar_type()}, 2);
  detail::check_shape(base, op, "base", compact, what);
  TORCH_CHECK(step >= 1, op, ": step counts from 1 (the first AdamW step is step=1), got ", step);
  {  // the four tensors written in place alias nothing (each other, index, grad, base)
    const std::pair<const char*, const at::Tensor*> written[] = {
        {"weight", &weight}, {"delta", &delta}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
    const std::pair<const char*, const at::Tensor*> args[] = {
        {"weight", &weight}, {"delta", &delta}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq},
        {"index", &index},   {"grad", &grad},   {"base", &base}};
    for (size_t i = 0; i < 4; ++i) {
      for (size_t j = i + 1; j < 7; ++j) {
        detail::check_no_overlap(*written[i].second, written[i].first, *args[j].second, args[j].first, op);
      }
    }
  }
  if (K == 0) return;
  const int64_t limit = weight.size(dim);
  detail::check_ids_in_range(index, limit, op, "index", dim == 0 ? "weight.shape[0]" : "weight.shape[1]");
  {  // unique ids: a repeated row/column would be written twice, racing between threads
    std::vector<uint8_t> seen(static_cast<size_t>(limit), 0);
    const int64_t* idx = index.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(!seen[idx[k]], op, ": index holds ", idx[k], " twice (index[", k,
                  "]); ensemble indices must be unique (use torch.unique(index))");
      seen[idx[k]] = 1;
    }
  }

  AdamParams p;
  p.has_decay = weight_decay != 0.0;
  p.decay = static_cast<float>(1.0 - lr * weight_decay);
  p.lerp_w = static_cast<float>(1.0 - beta1);
  p.lerp_small = std::abs(p.lerp_w) < 0.5f;
  p.lerp_w1 = p.lerp_w - 1.0f;
  p.beta2 = static_cast<float>(beta2);
  p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  p.neg_step = static_cast<float>(-(lr / bc1));
  p.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  p.eps = static_cast<float>(eps);
  p.scale = static_cast<float>(scale);

  detail::dispatch_float(weight.scalar_type(), op, [&](auto e) {
    using E = decltype(e);
    run<E>(weight, index, grad, delta, exp_avg, exp_avg_sq, base, dim, p);
  });
}

}  // namespace cpu
}  // namespace kne
