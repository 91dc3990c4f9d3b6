// kne::nullspace_project_ on CPU: the compact fp32 row delta [K, n] projected off span(basis), basis
// fp32 [n, r] with orthonormal columns, then the ensemble rows of the weight rewritten:
//
//   coef[k, :]  = sum_i delta[k, i] * basis[i, :]            (fp32 accumulation, i ascending)
//   delta[k, i] = delta[k, i] - sum_j coef[k, j] * basis[i, j] (fp32, one dot per element)
//   weight[index[k], i] = rne(base[k, i] + scale * delta[k, i])
//
// Rows are independent: one task per block of up to kRows rows, which reads `basis` twice (once
// per phase) for the whole block, so a K-row delta streams the basis 2 * ceil(K / kRows) times.
// The inner loops run over contiguous basis rows and vectorise (KNE_CLONES picks AVX-512/AVX2).
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace kne {
namespace cpu {

namespace {

constexpr int64_t kRows = 4;

// coef[q, :] += d[q] * brow[:] for the q < rows of the block (one basis row).
KNE_CLONES void axpy_rows(int64_t rows, int64_t r, const float* KNE_RESTRICT d, int64_t dstride,
                          const float* KNE_RESTRICT brow, float* KNE_RESTRICT coef) {
  for (int64_t q = 0; q < rows; ++q) {
    const float s = d[q * dstride];
    if (s == 0.0f) continue;
    float* KNE_RESTRICT c = coef + q * r;
    KNE_SIMD
    for (int64_t j = 0; j < r; ++j) c[j] += s * brow[j];
  }
}

KNE_CLONES float dot(int64_t r, const float* KNE_RESTRICT a, const float* KNE_RESTRICT b) {
  float acc = 0.0f;
  KNE_SIMD_SUM(acc)
  for (int64_t j = 0; j < r; ++j) acc += a[j] * b[j];
  return acc;
}

template <typename E>
void run(at::Tensor& weight, const at::Tensor& index, at::Tensor& delta, const at::Tensor& basis,
         const at::Tensor& base, float scale) {
  using S = typename E::storage;
  const int64_t n = delta.size(1), K = delta.size(0), r = basis.size(1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  float* d = delta.mutable_data_ptr<float>();
  const float* B = basis.const_data_ptr<float>();
  const S* b = detail::data_of<E>(base);
  S* w = detail::mutable_data_of<E>(weight);
  const int64_t blocks = (K + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> coef(static_cast<size_t>(kRows * std::max<int64_t>(r, 1)));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t k0 = blk * kRows, rows = std::min(kRows, K - k0);
      float* dk = d + k0 * n;
      if (r > 0) {
        std::fill(coef.begin(), coef.end(), 0.0f);
        for (int64_t i = 0; i < n; ++i) axpy_rows(rows, r, dk + i, n, B + i * r, coef.data());
        for (int64_t q = 0; q < rows; ++q) {
          const float* c = coef.data() + q * r;
          float* dq = dk + q * n;
          for (int64_t i = 0; i < n; ++i) dq[i] -= dot(r, c, B + i * r);
        }
      }
      for (int64_t q = 0; q < rows; ++q) {
        const float* dq = dk + q * n;
        const S* bq = b + (k0 + q) * n;
        S* wq = w + idx[k0 + q] * n;
        for (int64_t i = 0; i < n; ++i) wq[i] = detail::store_as<E>(E::load(bq[i]) + scale * dq[i]);
      }
    }
  });
}

}  // namespace

void nullspace_project_(at::Tensor& weight, const at::Tensor& index, at::Tensor& delta, const at::Tensor& basis,
                        const at::Tensor& base, double scale) {
  constexpr const char* op = "kne::nullspace_project_";
  using detail::check_tensor;
  check_tensor(weight, op, "weight", {at::kFloat, at::kHalf, at::kBFloat16}, 2);
  check_tensor(index, op, "index", {at::kLong}, 1);
  const int64_t n = weight.size(1), K = index.numel();
  check_tensor(delta, op, "delta", {at::kFloat}, 2);
  detail::check_shape(delta, op, "delta", {K, n}, "the compact rows [K, weight.shape[1]], K = index.numel()");
  check_tensor(basis, op, "basis", {at::kFloat}, 2);
  TORCH_CHECK(basis.size(0) == n, op, ": basis must be [weight.shape[1]=", n, ", r] (orthonormal key directions "
              "as columns), got shape ", basis.sizes());
  check_tensor(base, op, "base", {weight.scalar_type()}, 2);
  detail::check_shape(base, op, "base", {K, n}, "the compact rows [K, weight.shape[1]]");
  detail::check_no_overlap(delta, "delta", weight, "weight", op);  // the two tensors written in place alias nothing
  for (const auto& [t, nm] : {std::pair<const at::Tensor*, const char*>{&index, "index"}, {&basis, "basis"},
                              {&base, "base"}}) {
    detail::check_no_overlap(weight, "weight", *t, nm, op);
    detail::check_no_overlap(delta, "delta", *t, nm, op);
  }
  if (K == 0 || n == 0) return;
  detail::check_ids_in_range(index, weight.size(0), op, "index", "weight.shape[0]");
  detail::dispatch_float(weight.scalar_type(), op, [&](auto e) {
    run<decltype(e)>(weight, index, delta, basis, base, static_cast<float>(scale));
  });
}

}  // namespace cpu
}  // namespace kne
