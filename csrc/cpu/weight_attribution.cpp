// kne::weight_attribution_ on CPU: out += sum over `dim` of weight * grad (|weight * grad| when
// `absolute`), products and sums in float32, one pass over weight and grad, no temporary of the
// weight's size.
//
// dim=1 (one score per row): each row is a dot product over blocks of 512 columns with 32
//   independent float accumulators (vector lanes), block sums added in order. Rows longer than 64K
//   columns are cut into column chunks whose partial sums are added in chunk order.
// dim=0 (one score per column): the column reduction of neuron_attribution_ (common.h).
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>

namespace kne {
namespace cpu {

namespace {

constexpr int64_t kLanes = 32;   // independent accumulators per row
constexpr int64_t kBlock = 512;  // columns per block sum

// dst[r - r0] = sum over c in [c0, c1) of f(a[r, c] * b[r, c]), for rows r in [r0, r1).
template <typename E, bool ABS>
KNE_CLONES void row_dots(float* KNE_RESTRICT dst, int64_t dst_stride, const typename E::storage* KNE_RESTRICT a,
                         const typename E::storage* KNE_RESTRICT b, int64_t C, int64_t r0, int64_t r1, int64_t c0,
                         int64_t c1) {
  using S = typename E::storage;
  for (int64_t r = r0; r < r1; ++r) {
    const S* KNE_RESTRICT ar = a + r * C;
    const S* KNE_RESTRICT br = b + r * C;
    float total = 0.0f;
    for (int64_t x0 = c0; x0 < c1; x0 += kBlock) {
      const int64_t x1 = std::min(c1, x0 + kBlock);
      float acc[kLanes] = {0.0f};
      int64_t i = x0;
      for (; i + kLanes <= x1; i += kLanes) {
        KNE_SIMD
        for (int64_t j = 0; j < kLanes; ++j) {
          float p = E::load(ar[i + j]) * E::load(br[i + j]);
          if (ABS) p = std::fabs(p);
          acc[j] += p;
        }
      }
      float tail = 0.0f;
      for (; i < x1; ++i) {
        float p = E::load(ar[i]) * E::load(br[i]);
        if (ABS) p = std::fabs(p);
        tail += p;
      }
      for (int64_t h = kLanes / 2; h >= 1; h /= 2) {
        for (int64_t j = 0; j < h; ++j) acc[j] += acc[j + h];
      }
      total += acc[0] + tail;
    }
    dst[(r - r0) * dst_stride] = total;
  }
}

template <typename E>
void row_sums(at::Tensor& out, const at::Tensor& weight, const at::Tensor& grad, bool absolute) {
  using S = typename E::storage;
  const int64_t R = weight.size(0), C = weight.size(1);
  const S* a = detail::data_of<E>(weight);
  const S* b = detail::data_of<E>(grad);
  float* o = out.mutable_data_ptr<float>();
  auto fn = absolute ? &row_dots<E, true> : &row_dots<E, false>;
  // Column chunks of at most 64K (a multiple of the block), so that short, very long rows still
  // spread over threads; fixed by the shape.
  const int64_t chunks = (C + 65535) / 65536;
  if (chunks == 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      constexpr int64_t B = 256;
      float tmp[B];
      for (int64_t r = r0; r < r1; r += B) {
        const int64_t re = std::min(r1, r + B);
        fn(tmp, 1, a, b, C, r, re, 0, C);
        for (int64_t i = r; i < re; ++i) o[i] += tmp[i - r];
      }
    });
    return;
  }
  const int64_t width = ((C + chunks - 1) / chunks + kBlock - 1) / kBlock * kBlock;
  std::unique_ptr<float[]> part(new float[static_cast<size_t>(R * chunks)]);
  float* p = part.get();
  at::parallel_for(0, R * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, k = t % chunks;
      const int64_t c0 = std::min(C, k * width), c1 = std::min(C, c0 + width);
      fn(p + t, 1, a, b, C, r, r + 1, c0, c1);
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    float s = p[r * chunks];
    for (int64_t k = 1; k < chunks; ++k) s += p[r * chunks + k];
    o[r] += s;
  }
}

}  // namespace

void weight_attribution_(at::Tensor& out, const at::Tensor& weight, const at::Tensor& grad, int64_t dim,
                         bool absolute) {
  constexpr const char* op = "kne::weight_attribution_";
  using detail::check_tensor;
  check_tensor(weight, op, "weight", {at::kFloat, at::kHalf, at::kBFloat16}, 2);
  check_tensor(grad, op, "grad", {at::kFloat, at::kHalf, at::kBFloat16}, 2);
  TORCH_CHECK(weight.scalar_type() == grad.scalar_type(), op, ": weight (", weight.scalar_type(), ") and grad (",
              grad.scalar_type(), ") must have the same dtype (cast one with .to())");
  TORCH_CHECK(weight.sizes() == grad.sizes(), op, ": weight ", weight.sizes(), " and grad ", grad.sizes(),
              " must have the same shape [R, C]");
  TORCH_CHECK(dim >= -2 && dim <= 1, op, ": dim must be 0 (one score per column) or 1 (one score per row), got ",
              dim);
  dim = dim < 0 ? dim + 2 : dim;
  check_tensor(out, op, "out", {at::kFloat}, 1);
  const int64_t R = weight.size(0), C = weight.size(1);
  TORCH_CHECK(out.size(0) == (dim == 1 ? R : C), op, ": out must have shape [", (dim == 1 ? R : C), "] (",
              (dim == 1 ? "weight.shape[0]: one score per row, dim=1" : "weight.shape[1]: one score per column, dim=0"),
              "), got ", out.sizes());
  detail::check_no_overlap(out, "out", weight, "weight", op);
  detail::check_no_overlap(out, "out", grad, "grad", op);
  if (R == 0 || C == 0) return;
  if (dim == 0) {
    at::Tensor out2 = out.view({1, C});
    detail::column_reduce(out2, weight, grad, nullptr, nullptr, 1.0f, absolute);
    return;
  }
  detail::dispatch_float(weight.scalar_type(), op, [&](auto e) {
    using E = decltype(e);
    row_sums<E>(out, weight, grad, absolute);
  });
}

}  // namespace cpu
}  // namespace kne
