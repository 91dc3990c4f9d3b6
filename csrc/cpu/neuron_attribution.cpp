// kne::neuron_attribution_ on CPU, and the column reduction it shares with weight_attribution_.
//
//   out[seg[n], d] += scale_value * scale[n] * act[n, d] * grad[n, d]      (sum over rows n)
//
// Work is cut into tasks (column tile x row chunk). Each task sums its rows into its own float32
// partial [S, tile] (one slice of a [chunks, S, D] buffer); a second pass adds the chunk partials
// in chunk order into `out`. The cut depends only on the shapes, never on the thread count, so the
// result is the same with 1 or 64 threads, and no two threads ever write the same float.
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>

namespace kne {
namespace cpu {
namespace detail {

namespace {

// Sums rows [n0, n1) of one column tile [c0, c0 + w) into acc (row stride ld, already zeroed).
// One loop body per (element type, segments?, scale?, absolute?), compiled once per ISA.
template <typename E, bool SEG, bool SCALE, bool ABS>
KNE_CLONES void reduce_tile(float* KNE_RESTRICT acc, int64_t ld, const typename E::storage* KNE_RESTRICT a,
                            const typename E::storage* KNE_RESTRICT b, int64_t D, int64_t c0, int64_t w,
                            int64_t n0, int64_t n1, const int64_t* KNE_RESTRICT seg,
                            const float* KNE_RESTRICT scale, float scale_value) {
  using S = typename E::storage;
  if (!SEG && !SCALE) {
    // Four rows per sweep: one load/store of the accumulator per four products.
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const S* KNE_RESTRICT a0 = a + n * D + c0;
      const S* KNE_RESTRICT b0 = b + n * D + c0;
      const S* KNE_RESTRICT a1 = a0 + D;
      const S* KNE_RESTRICT b1 = b0 + D;
      const S* KNE_RESTRICT a2 = a1 + D;
      const S* KNE_RESTRICT b2 = b1 + D;
      const S* KNE_RESTRICT a3 = a2 + D;
      const S* KNE_RESTRICT b3 = b2 + D;
      KNE_SIMD
      for (int64_t i = 0; i < w; ++i) {
        float p0 = E::load(a0[i]) * E::load(b0[i]);
        float p1 = E::load(a1[i]) * E::load(b1[i]);
        float p2 = E::load(a2[i]) * E::load(b2[i]);
        float p3 = E::load(a3[i]) * E::load(b3[i]);
        if (ABS) {
          p0 = std::fabs(p0);
          p1 = std::fabs(p1);
          p2 = std::fabs(p2);
          p3 = std::fabs(p3);
        }
        acc[i] += ((p0 + p1) + (p2 + p3)) * scale_value;
      }
    }
    for (; n < n1; ++n) {
      const S* KNE_RESTRICT a0 = a + n * D + c0;
      const S* KNE_RESTRICT b0 = b + n * D + c0;
      KNE_SIMD
      for (int64_t i = 0; i < w; ++i) {
        float p = E::load(a0[i]) * E::load(b0[i]);
        if (ABS) p = std::fabs(p);
        acc[i] += p * scale_value;
      }
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const S* KNE_RESTRICT a0 = a + n * D + c0;
    const S* KNE_RESTRICT b0 = b + n * D + c0;
    const float s = SCALE ? scale[n] * scale_value : scale_value;
    float* KNE_RESTRICT dst = SEG ? acc + seg[n] * ld : acc;
    KNE_SIMD
    for (int64_t i = 0; i < w; ++i) {
      float p = E::load(a0[i]) * E::load(b0[i]);
      if (ABS) p = std::fabs(p);
      dst[i] += p * s;
    }
  }
}

using TileFn = void (*)(float*, int64_t, const void*, const void*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, const int64_t*, const float*, float);

template <typename E, bool SEG, bool SCALE, bool ABS>
void reduce_tile_erased(float* acc, int64_t ld, const void* a, const void* b, int64_t D, int64_t c0,
                        int64_t w, int64_t n0, int64_t n1, const int64_t* seg, const float* scale,
                        float scale_value) {
  reduce_tile<E, SEG, SCALE, ABS>(acc, ld, static_cast<const typename E::storage*>(a),
                                  static_cast<const typename E::storage*>(b), D, c0, w, n0, n1, seg, scale,
                                  scale_value);
}

template <typename E>
TileFn pick_tile_fn(bool seg, bool scale, bool absolute) {
  const int key = (seg ? 4 : 0) | (scale ? 2 : 0) | (absolute ? 1 : 0);
  switch (key) {
    case 0: return &reduce_tile_erased<E, false, false, false>;
    case 1: return &reduce_tile_erased<E, false, false, true>;
    case 2: return &reduce_tile_erased<E, false, true, false>;
    case 3: return &reduce_tile_erased<E, false, true, true>;
    case 4: return &reduce_tile_erased<E, true, false, false>;
    case 5: return &reduce_tile_erased<E, true, false, true>;
    case 6: return &reduce_tile_erased<E, true, true, false>;
    default: return &reduce_tile_erased<E, true, true, true>;
  }
}

// out[x] += sum over chunks c (in order) of part[c * stride + x], x in [0, count).
KNE_CLONES void add_chunks(float* KNE_RESTRICT out, const float* KNE_RESTRICT part, int64_t chunks,
                           int64_t stride, int64_t x0, int64_t x1) {
  constexpr int64_t B = 256;
  float tmp[B];
  for (int64_t x = x0; x < x1; x += B) {
    const int64_t w = std::min(B, x1 - x);
    KNE_SIMD
    for (int64_t i = 0; i < w; ++i) tmp[i] = part[x + i];
    for (int64_t c = 1; c < chunks; ++c) {
      const float* KNE_RESTRICT p = part + c * stride + x;
      KNE_SIMD
      for (int64_t i = 0; i < w; ++i) tmp[i] += p[i];
    }
    KNE_SIMD
    for (int64_t i = 0; i < w; ++i) out[x + i] += tmp[i];
  }
}

}  // namespace

void column_reduce(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const int64_t* segments,
                   const float* scale, float scale_value, bool absolute) {
  const int64_t N = a.size(0), D = a.size(1), S = out.size(0);
  if (N == 0 || D == 0 || S == 0) return;
  const bool seg = segments != nullptr;

  // Column tiles: the accumulator of a task stays in L1/L2 (at most 4096 columns, and at most
  // ~64K floats over the S segment rows).
  int64_t tile = std::min<int64_t>(D, 4096);
  if (seg) tile = std::min<int64_t>(tile, std::max<int64_t>(64, (int64_t(1) << 16) / S));
  int64_t tiles = (D + tile - 1) / tile;
  tile = (D + tiles - 1) / tiles;
  if (tile < D) tile = std::min<int64_t>(D, (tile + 15) / 16 * 16);
  tiles = (D + tile - 1) / tile;

  // Row chunks: fixed by the shapes (>= 256 rows each), enough tasks for many threads, and the
  // partial sums at most an eighth of the work (chunks * S <= N / 8).
  int64_t chunks = std::max<int64_t>(1, N / 256);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, 128 / tiles));
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, N / (8 * S)));
  const int64_t rows = (N + chunks - 1) / chunks;
  chunks = (N + rows - 1) / rows;

  const int64_t stride = S * D;
  // Every float of the partials is zeroed by the task that owns it (no serial fill here).
  std::unique_ptr<float[]> part(new float[static_cast<size_t>(chunks * stride)]);
  TileFn fn = nullptr;
  dispatch_float(a.scalar_type(), "column_reduce", [&](auto e) {
    using E = decltype(e);
    fn = pick_tile_fn<E>(seg, scale != nullptr, absolute);
  });
  const void* pa = a.const_data_ptr();
  const void* pb = b.const_data_ptr();
  float* partp = part.get();
  const int64_t tasks = tiles * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / tiles, ti = t % tiles;
      const int64_t c0 = ti * tile, w = std::min(tile, D - c0);
      const int64_t n0 = chunk * rows, n1 = std::min(N, n0 + rows);
      float* acc = partp + chunk * stride + c0;
      for (int64_t s = 0; s < S; ++s) std::fill_n(acc + s * D, w, 0.0f);
      fn(acc, D, pa, pb, D, c0, w, n0, n1, segments, scale, scale_value);
    }
  });
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, stride, 16384, [&](int64_t x0, int64_t x1) {
    add_chunks(o, partp, chunks, stride, x0, x1);
  });
}

void check_ids_in_range(const at::Tensor& ids, int64_t limit, const char* op, const char* name,
                        const char* limit_name) {
  const int64_t n = ids.numel();
  const int64_t* p = ids.const_data_ptr<int64_t>();
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    bool ok = true;
    for (int64_t i = i0; i < i1; ++i) ok &= (p[i] >= 0) & (p[i] < limit);
    if (!ok) {
      for (int64_t i = i0; i < i1; ++i) {
        if (p[i] < 0 || p[i] >= limit) {
          int64_t expected = -1;
          bad.compare_exchange_strong(expected, i);
          break;
        }
      }
    }
  });
  const int64_t i = bad.load();
  TORCH_CHECK(i < 0, op, ": ", name, "[", i, "] = ", (i < 0 ? 0 : p[i]), " is out of range: ", name,
              " values must lie in [0, ", limit, ") (", limit_name, " = ", limit, ")");
}

}  // namespace detail

void neuron_attribution_(at::Tensor& out, const at::Tensor& act, const at::Tensor& grad,
                         const std::optional<at::Tensor>& segments, const std::optional<at::Tensor>& scale,
                         double scale_value) {
  constexpr const char* op = "kne::neuron_attribution_";
  using detail::check_tensor;
  check_tensor(act, op, "act", {at::kFloat, at::kHalf, at::kBFloat16}, 2);
  check_tensor(grad, op, "grad", {at::kFloat, at::kHalf, at::kBFloat16}, 2);
  TORCH_CHECK(act.scalar_type() == grad.scalar_type(), op, ": act (", act.scalar_type(), ") and grad (",
              grad.scalar_type(), ") must have the same dtype (cast one with .to())");
  TORCH_CHECK(act.sizes() == grad.sizes(), op, ": act ", act.sizes(), " and grad ", grad.sizes(),
              " must have the same shape [N, D]");
  const int64_t N = act.size(0), D = act.size(1);
  check_tensor(out, op, "out", {at::kFloat}, 2);
  const int64_t S = out.size(0);
  TORCH_CHECK(out.size(1) == D, op, ": out must have shape [S, D] with D = ", D, " (act's columns), got ",
              out.sizes());
  const int64_t* seg = nullptr;
  if (segments.has_value() && segments->defined()) {
    check_tensor(*segments, op, "segments", {at::kLong}, 1);
    TORCH_CHECK(segments->size(0) == N, op, ": segments must have shape [N] = [", N,
                "] (one id per row of act), got ", segments->sizes());
    detail::check_ids_in_range(*segments, S, op, "segments", "out.shape[0]");
    seg = segments->const_data_ptr<int64_t>();
  } else {
    TORCH_CHECK(S == 1, op, ": without segments out must have shape [1, D], got ", out.sizes(),
                " (pass segments to accumulate per segment)");
  }
  const float* sc = nullptr;
  if (scale.has_value() && scale->defined()) {
    check_tensor(*scale, op, "scale", {at::kFloat}, 1);
    TORCH_CHECK(scale->size(0) == N, op, ": scale must have shape [N] = [", N,
                "] (one weight per row of act), got ", scale->sizes());
    sc = scale->const_data_ptr<float>();
  }
  detail::check_no_overlap(out, "out", act, "act", op);
  detail::check_no_overlap(out, "out", grad, "grad", op);
  if (seg != nullptr) detail::check_no_overlap(out, "out", *segments, "segments", op);
  if (sc != nullptr) detail::check_no_overlap(out, "out", *scale, "scale", op);
  detail::column_reduce(out, act, grad, seg, sc, static_cast<float>(scale_value), false);
}

}  // namespace cpu
}  // namespace kne
