// The ensemble-selection ops on CPU: kne::ensemble_aggregate (max/mean over requests, the mean
// bit for bit torch's), kne::order_statistics (exact k-th and (k+1)-th smallest at any size) and
// kne::threshold_mask (mask and per-row counts in one pass). kne_kernels.ensemble_select
// chains them.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace kne {
namespace cpu {

namespace {

// =============================================================================================
// ensemble_aggregate
// =============================================================================================
//
// mode 0: max over R (NaN propagates, as torch.amax).
// mode 1: the mean, equal bit for bit to torch's CPU `scores.mean(0)`, which is
//   `sum(0)` (ATen's cascade_sum, SumKernel.cpp) followed by `div_(R)` in float32. For a
//   contiguous [R, M] input cascade_sum reduces each column in one of two orders:
//   - "cascade": a running float sum over r = 0..R-1, flushed into up to four levels every
//     2^level_power rows (level_power = max(4, ceil(log2 R) / 4)), i.e. a plain in-order sum for
//     R < 16. Columns in whole groups of 4 vectors (4 * W columns, W = floats per ATen vector,
//     measured once by aten_float_vec_width: 8 with AVX2, 16 where ATen runs AVX-512 kernels), or
//     of 4 columns when M < W.
//   - "ilp4": four cascade sums over r = 4i + k, the R % 4 last rows added to the first, then the
//     four added in order. The remaining columns.
//   M == 1 and R >= W takes ATen's contiguous inner sum instead (emulated below).
//   ATen cuts the columns among threads at multiples of 32 floats, which keeps this partition for
//   any thread count except in a corner (a last thread's slice narrower than W); the kernel
//   reproduces the single-threaded partition always.

int64_t ceil_log2(int64_t x) {  // at::native::utils::CeilLog2
  if (x <= 2) return 1;
  uint64_t v = static_cast<uint64_t>(x) - 1;
  int64_t bits = 0;
  while (v) {
    ++bits;
    v >>= 1;
  }
  return bits;
}

// The float vector width ATen's sum kernel actually uses here. The reported capability is not
// enough (a torch build may run its 8-wide kernels on an AVX-512 machine), so it is measured once:
// in a contiguous [5, M] column sum, the first column is summed in cascade order when M >= 4 * W
// and in ilp4 order otherwise, and the two orders differ on this column (cascade: 0, ilp4: 3 *
// 2^-24). W is M / 4 for the smallest M in {16, 32, 64, 128} summed in cascade order.
int64_t aten_float_vec_width() {
  static const int64_t w = [] {
    for (int64_t M : {16, 32, 64, 128}) {
      at::Tensor x = at::zeros({5, M}, at::kFloat);
      const float tiny = std::ldexp(1.0f, -24);
      float* p = x.mutable_data_ptr<float>();
      p[0 * M] = 1.0f;
      p[1 * M] = p[2 * M] = p[3 * M] = tiny;
      p[4 * M] = -1.0f;
      if (x.sum(0).const_data_ptr<float>()[0] == 0.0f) return M / 4;
    }
    return int64_t(32);
  }();
  return w;
}

// Cascade sums (ATen's multi_row_sum, num_levels = 4) of `n` rows x[(i * step_rows) * ld + j],
// i in [0, n), for the w columns j in [0, w), into out[j].
KNE_CLONES void cascade_columns(float* KNE_RESTRICT out, const float* KNE_RESTRICT x, int64_t ld,
                                int64_t step_rows, int64_t n, int64_t w) {
  constexpr int64_t B = 128;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(n) / 4);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  for (int64_t j0 = 0; j0 < w; j0 += B) {
    const int64_t bw = std::min(B, w - j0);
    float acc[4][B];
    for (int l = 0; l < 4; ++l) std::fill_n(acc[l], bw, 0.0f);
    int64_t i = 0;
    while (i + level_step <= n) {
      for (int64_t j = 0; j < level_step; ++j, ++i) {
        const float* KNE_RESTRICT row = x + i * step_rows * ld + j0;
        KNE_SIMD
        for (int64_t c = 0; c < bw; ++c) acc[0][c] += row[c];
      }
      for (int64_t l = 1; l < 4; ++l) {
        KNE_SIMD
        for (int64_t c = 0; c < bw; ++c) {
          acc[l][c] += acc[l - 1][c];
          acc[l - 1][c] = 0.0f;
        }
        if ((i & (level_mask << (l * level_power))) != 0) break;
      }
    }
    for (; i < n; ++i) {
      const float* KNE_RESTRICT row = x + i * step_rows * ld + j0;
      KNE_SIMD
      for (int64_t c = 0; c < bw; ++c) acc[0][c] += row[c];
    }
    for (int64_t l = 1; l < 4; ++l) {
      KNE_SIMD
      for (int64_t c = 0; c < bw; ++c) acc[0][c] += acc[l][c];
    }
    std::copy_n(acc[0], bw, out + j0);
  }
}

// ATen's row_sum with ilp_factor 4 for the w columns [0, w) of x (row stride ld), into out.
void ilp4_columns(float* out, const float* x, int64_t ld, int64_t R, int64_t w) {
  const int64_t n4 = R / 4;
  std::vector<float> p(4 * static_cast<size_t>(w));
  for (int64_t k = 0; k < 4; ++k) cascade_columns(p.data() + k * w, x + k * ld, ld, 4, n4, w);
  for (int64_t i = n4 * 4; i < R; ++i)
    for (int64_t c = 0; c < w; ++c) p[c] += x[i * ld + c];
  for (int64_t k = 1; k < 4; ++k)
    for (int64_t c = 0; c < w; ++c) p[c] += p[k * w + c];
  std::copy_n(p.data(), w, out);
}

// ATen's vectorized_inner_sum of one contiguous row of R floats (R >= W).
float inner_sum(const float* x, int64_t R, int64_t W) {
  const int64_t nvec = R / W;  // vectors of W lanes, reduced with row_sum<vacc_t> (ilp 4)
  std::vector<float> lanes(static_cast<size_t>(W));
  ilp4_columns(lanes.data(), x, W, nvec, W);
  float acc = 0.0f;
  for (int64_t k = nvec * W; k < R; ++k) acc += x[k];
  for (int64_t l = 0; l < W; ++l) acc += lanes[l];
  return acc;
}

constexpr int64_t kColBlock = 32;  // columns held in registers while the rows stream by

// Column-wise max over R rows (NaN propagates, as torch.amax).
KNE_CLONES void max_columns(float* KNE_RESTRICT out, const float* KNE_RESTRICT x, int64_t ld, int64_t R,
                            int64_t w) {
  int64_t c0 = 0;
  for (; c0 + kColBlock <= w; c0 += kColBlock) {
    float m[kColBlock];
    KNE_SIMD
    for (int64_t j = 0; j < kColBlock; ++j) m[j] = x[c0 + j];
    for (int64_t r = 1; r < R; ++r) {
      const float* KNE_RESTRICT row = x + r * ld + c0;
      KNE_SIMD
      for (int64_t j = 0; j < kColBlock; ++j) {
        const float v = row[j];
        m[j] = (v > m[j] || v != v) ? v : m[j];
      }
    }
    KNE_SIMD
    for (int64_t j = 0; j < kColBlock; ++j) out[c0 + j] = m[j];
  }
  for (int64_t c = c0; c < w; ++c) {
    float m = x[c];
    for (int64_t r = 1; r < R; ++r) {
      const float v = x[r * ld + c];
      m = (v > m || v != v) ? v : m;
    }
    out[c] = m;
  }
}

// The mean of columns summed in order r = 0..R-1 (the cascade order when R < 2^level_power):
// (0 + sum) / R. Adding the zero levels of the cascade is the identity but for the sign of a zero
// sum, and the final `0 +` makes that +0 in both.
KNE_CLONES void mean_columns_in_order(float* KNE_RESTRICT out, const float* KNE_RESTRICT x, int64_t ld, int64_t R,
                                      int64_t w, float Rf) {
  int64_t c0 = 0;
  for (; c0 + kColBlock <= w; c0 += kColBlock) {
    float s[kColBlock];
    KNE_SIMD
    for (int64_t j = 0; j < kColBlock; ++j) s[j] = 0.0f;
    for (int64_t r = 0; r < R; ++r) {
      const float* KNE_RESTRICT row = x + r * ld + c0;
      KNE_SIMD
      for (int64_t j = 0; j < kColBlock; ++j) s[j] += row[j];
    }
    KNE_SIMD
    for (int64_t j = 0; j < kColBlock; ++j) out[c0 + j] = (0.0f + s[j]) / Rf;
  }
  for (int64_t c = c0; c < w; ++c) {
    float s = 0.0f;
    for (int64_t r = 0; r < R; ++r) s += x[r * ld + c];
    out[c] = (0.0f + s) / Rf;
  }
}

KNE_CLONES void finish_mean(float* KNE_RESTRICT out, int64_t w, float R) {
  KNE_SIMD
  for (int64_t c = 0; c < w; ++c) out[c] = (0.0f + out[c]) / R;  // ATen: fill_(0), +=, div_(R)
}

// =============================================================================================
// order_statistics
// =============================================================================================
//
// Exact at any size (no sort, no size limit), on uint32 keys whose unsigned order is the float
// order: flip the sign bit of a positive float, invert all bits of a negative one. -0.0 is mapped
// to the key of +0.0 (torch.kthvalue treats them as equal; the kernel returns +0.0 for a zero
// order statistic, which compares exactly like -0.0), and every NaN to the largest key
// (torch.kthvalue sorts NaN last; the result is then NaN). select_pair below: usually one pass
// (a sampled bracket), else a two-pass radix select on 16-bit digits (histograms per thread).

KNE_INLINE uint32_t key_of(float f) {
  uint32_t u = detail::bits_from_f32(f);
  u = (u == 0x80000000u) ? 0u : u;
  const uint32_t k = u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
  return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0xFFFFFFFFu : k;
}

KNE_INLINE float float_of(uint32_t k) {
  return detail::f32_from_bits((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

constexpr int64_t kBins = 65536;
constexpr int64_t kKeyBlock = 2048;

// hist[key >> 16] += 1 over x[0, n).
KNE_CLONES void histogram_high(uint32_t* KNE_RESTRICT hist, const float* KNE_RESTRICT x, int64_t n) {
  uint32_t keys[kKeyBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kKeyBlock) {
    const int64_t w = std::min(kKeyBlock, n - i0);
    KNE_SIMD
    for (int64_t i = 0; i < w; ++i) keys[i] = key_of(x[i0 + i]) >> 16;
    for (int64_t i = 0; i < w; ++i) ++hist[keys[i]];
  }
}

// hist[key & 0xFFFF] += 1 over the elements of x[0, n) whose key >> 16 == bucket.
KNE_CLONES void histogram_low(uint32_t* KNE_RESTRICT hist, const float* KNE_RESTRICT x, int64_t n,
                              uint32_t bucket) {
  uint32_t keys[kKeyBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kKeyBlock) {
    const int64_t w = std::min(kKeyBlock, n - i0);
    KNE_SIMD
    for (int64_t i = 0; i < w; ++i) keys[i] = key_of(x[i0 + i]);
    for (int64_t i = 0; i < w; ++i) {
      const uint32_t k = keys[i];
      if ((k >> 16) == bucket) ++hist[k & 0xFFFFu];  // a well-predicted branch: few or all match
    }
  }
}

// Largest key in bucket b1 and smallest key in bucket b2 over x[0, n).
KNE_CLONES void bucket_extremes(const float* KNE_RESTRICT x, int64_t n, uint32_t b1, uint32_t b2, uint32_t* max1,
                                uint32_t* min2) {
  uint32_t hi = 0, lo = 0xFFFFFFFFu;
  KNE_SIMD_MAXMIN(hi, lo)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = key_of(x[i]);
    const uint32_t top = k >> 16;
    hi = std::max(hi, top == b1 ? k : 0u);
    lo = std::min(lo, top == b2 ? k : 0xFFFFFFFFu);
  }
  *max1 = hi;
  *min2 = lo;
}

// Bucket holding rank r (0-based) in a histogram; *before = count of keys in lower buckets.
int64_t find_bucket(const uint64_t* hist, int64_t bins, uint64_t r, uint64_t* before) {
  uint64_t cum = 0;
  for (int64_t b = 0; b < bins; ++b) {
    if (r < cum + hist[b]) {
      *before = cum;
      return b;
    }
    cum += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "order_statistics: rank ", r, " beyond the histogram total ", cum);
  return -1;
}

// Ranks r and r1 (r1 == r or r + 1) among n keys, in place: an nth_element, then the smallest of
// the keys after position r.
void select_in(uint32_t* keys, int64_t n, int64_t r, int64_t r1, uint32_t* ka, uint32_t* kb) {
  std::nth_element(keys, keys + r, keys + n);
  *ka = keys[r];
  *kb = (r1 == r) ? keys[r] : *std::min_element(keys + r + 1, keys + n);
}

int64_t select_chunks(int64_t M) {
  // One chunk per thread but at least 2^19 elements each (below that the work, ~1 ms, is not worth a
  // parallel region), and each under 2^31 elements (uint32 counts).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::min<int64_t>(threads, M >> 19);
  return std::max<int64_t>({chunks, int64_t(1), (M + (int64_t(1) << 31) - 1) >> 31});
}

// Exact radix select: a histogram of the top 16 bits of the keys locates the bucket of rank k, a
// second pass over that bucket (histogram of the low 16 bits, or its extremes) the key itself.
void radix_select(const float* x, int64_t M, int64_t k, int64_t k1, uint32_t* ka, uint32_t* kb) {
  const int64_t chunks = select_chunks(M);
  const int64_t len = (M + chunks - 1) / chunks;
  std::unique_ptr<uint32_t[]> hists(new uint32_t[static_cast<size_t>(chunks * kBins)]);
  std::vector<uint64_t> hist(kBins);

  // Pass 1: histogram of the top 16 bits of the keys.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t* h = hists.get() + c * kBins;
      std::fill_n(h, kBins, 0u);
      const int64_t i0 = c * len, i1 = std::min(M, i0 + len);
      if (i1 > i0) histogram_high(h, x + i0, i1 - i0);
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t b = 0; b < kBins; ++b) hist[b] += hists[c * kBins + b];
  uint64_t before1 = 0, before2 = 0;
  const uint32_t b1 = static_cast<uint32_t>(find_bucket(hist.data(), kBins, k, &before1));
  const uint32_t b2 = static_cast<uint32_t>(find_bucket(hist.data(), kBins, k1, &before2));

  if (b1 != b2) {
    // Adjacent ranks in different buckets: rank k is the largest key of b1, rank k+1 the smallest of b2.
    std::vector<uint32_t> hi(chunks, 0u), lo(chunks, 0xFFFFFFFFu);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * len, i1 = std::min(M, i0 + len);
        if (i1 > i0) bucket_extremes(x + i0, i1 - i0, b1, b2, &hi[c], &lo[c]);
      }
    });
    uint32_t a = 0, b = 0xFFFFFFFFu;
    for (int64_t c = 0; c < chunks; ++c) {
      if (hi[c] >> 16 == b1) a = std::max(a, hi[c]);
      if (lo[c] >> 16 == b2) b = std::min(b, lo[c]);
    }
    TORCH_INTERNAL_ASSERT(a >> 16 == b1 && b >> 16 == b2, "order_statistics: inconsistent second pass");
    *ka = a;
    *kb = b;
    return;
  }
  // Pass 2: histogram of the low 16 bits within the bucket.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t* h = hists.get() + c * kBins;
      std::fill_n(h, kBins, 0u);
      const int64_t i0 = c * len, i1 = std::min(M, i0 + len);
      if (i1 > i0) histogram_low(h, x + i0, i1 - i0, b1);
    }
  });
  std::fill(hist.begin(), hist.end(), 0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t b = 0; b < kBins; ++b) hist[b] += hists[c * kBins + b];
  uint64_t u1 = 0, u2 = 0;
  const int64_t lo1 = find_bucket(hist.data(), kBins, k - before1, &u1);
  const int64_t lo2 = find_bucket(hist.data(), kBins, k1 - before1, &u2);
  *ka = (b1 << 16) | static_cast<uint32_t>(lo1);
  *kb = (b1 << 16) | static_cast<uint32_t>(lo2);
}

// Counts the keys below lo and gathers the keys in [lo, lo + span] (at most cap of them; *gathered
// may exceed cap, then buf holds the first cap) over x[0, n).
KNE_CLONES void bracket_scan(const float* KNE_RESTRICT x, int64_t n, uint32_t lo, uint32_t span,
                             uint32_t* KNE_RESTRICT buf, int64_t cap, int64_t* below_out, int64_t* gathered) {
  constexpr int64_t B = 64;
  uint32_t keys[B];
  int64_t below = 0, count = 0;
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t w = std::min(B, n - i0);
    uint32_t nb = 0, ni = 0;
    KNE_SIMD_SUM2(nb, ni)
    for (int64_t i = 0; i < w; ++i) {
      const uint32_t key = key_of(x[i0 + i]);
      keys[i] = key;
      nb += key < lo;
      ni += (key - lo) <= span;  // unsigned: keys below lo wrap around
    }
    below += nb;
    if (ni == 0) continue;
    if (count + w <= cap) {  // branch-free compaction (the window's keys come at random)
      for (int64_t i = 0; i < w; ++i) {
        buf[count] = keys[i];
        count += (keys[i] - lo) <= span;
      }
    } else {
      for (int64_t i = 0; i < w; ++i) {
        if ((keys[i] - lo) <= span) {
          if (count < cap) buf[count] = keys[i];
          ++count;
        }
      }
    }
  }
  *below_out = below;
  *gathered = count;
}

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The k-th and k1-th smallest keys (k1 == k or k + 1), exact.
//  - M <= 8192: an nth_element on a copy of the keys.
//  - else, usually one pass: a fixed pseudo-random sample brackets the two ranks (+-4 sigma plus a
//    margin) by keys [lo, hi]; one parallel pass counts the keys below lo and gathers those in
//    [lo, hi]; an nth_element on the gathered keys finishes. When the bracket misses a rank or
//    gathers too many keys (heavy ties), the radix select runs instead. Either way the result is
//    exact; the sample only decides how fast.
void select_pair(const float* x, int64_t M, int64_t k, int64_t k1, uint32_t* ka, uint32_t* kb) {
  if (M <= 8192) {
    std::vector<uint32_t> keys(static_cast<size_t>(M));
    for (int64_t i = 0; i < M; ++i) keys[i] = key_of(x[i]);
    select_in(keys.data(), M, k, k1, ka, kb);
    return;
  }
  const int64_t s = M >= (int64_t(1) << 24)   ? 65536
                    : M >= (int64_t(1) << 20) ? 16384
                                              : std::max<int64_t>(1024, std::min<int64_t>(4096, M / 16));
  std::vector<uint32_t> sample(static_cast<size_t>(s));
  for (int64_t j = 0; j < s; ++j) sample[j] = key_of(x[splitmix64(static_cast<uint64_t>(j)) % static_cast<uint64_t>(M)]);
  const double q = double(k) / double(M), q1 = double(k1) / double(M);
  const double margin = 4.0 * std::sqrt(double(s) * std::max(q, q1) * (1.0 - std::min(q, q1))) + 8.0;
  const int64_t lo_r = static_cast<int64_t>(std::floor(q * double(s) - margin));
  const int64_t hi_r = static_cast<int64_t>(std::ceil(q1 * double(s) + margin));
  uint32_t lo = 0u, hi = 0xFFFFFFFFu;
  if (lo_r > 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_r, sample.end());
    lo = sample[lo_r];
  }
  if (hi_r < s - 1) {
    const auto from = sample.begin() + std::max<int64_t>(lo_r, 0);
    std::nth_element(from, sample.begin() + hi_r, sample.end());
    hi = sample[hi_r];
  }

  const int64_t chunks = select_chunks(M);
  const int64_t len = (M + chunks - 1) / chunks;
  const int64_t cap = std::max<int64_t>(int64_t(1) << 16, M / 16);  // per chunk
  std::unique_ptr<uint32_t[]> buf(new uint32_t[static_cast<size_t>(chunks * cap)]);
  std::vector<int64_t> below(chunks, 0), gathered(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * len, i1 = std::min(M, i0 + len);
      if (i1 > i0) bracket_scan(x + i0, i1 - i0, lo, hi - lo, buf.get() + c * cap, cap, &below[c], &gathered[c]);
    }
  });
  int64_t n_below = 0, n_in = 0;
  bool overflow = false;
  for (int64_t c = 0; c < chunks; ++c) {
    n_below += below[c];
    n_in += gathered[c];
    overflow = overflow || gathered[c] > cap;
  }
  if (overflow || k < n_below || k1 >= n_below + n_in) {
    radix_select(x, M, k, k1, ka, kb);
    return;
  }
  uint32_t* keys = buf.get();
  int64_t n = gathered[0];
  for (int64_t c = 1; c < chunks; ++c) {  // make the gathered keys contiguous
    std::memmove(keys + n, buf.get() + c * cap, static_cast<size_t>(gathered[c]) * sizeof(uint32_t));
    n += gathered[c];
  }
  select_in(keys, n, k - n_below, k1 - n_below, ka, kb);
}

// =============================================================================================
// threshold_mask
// =============================================================================================

template <bool POS>
KNE_CLONES int64_t mask_span(bool* KNE_RESTRICT m, const float* KNE_RESTRICT v, int64_t n, float thr) {
  uint8_t* KNE_RESTRICT mb = reinterpret_cast<uint8_t*>(m);
  int64_t total = 0;
  constexpr int64_t B = 1 << 14;
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t w = std::min(B, n - i0);
    int32_t cnt = 0;
    KNE_SIMD_SUM(cnt)
    for (int64_t i = 0; i < w; ++i) {
      const float x = v[i0 + i];
      const int32_t keep = POS ? ((x > thr) & (x > 0.0f)) : (x > thr);
      mb[i0 + i] = static_cast<uint8_t>(keep);
      cnt += keep;
    }
    total += cnt;
  }
  return total;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
at::Tensor ensemble_aggregate(const at::Tensor& scores, int64_t mode) {
  constexpr const char* op = "kne::ensemble_aggregate";
  detail::check_tensor(scores, op, "scores", {at::kFloat}, 2);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (max over requests) or 1 (mean), got ", mode);
  const int64_t R = scores.size(0), M = scores.size(1);
  TORCH_CHECK(R >= 1, op, ": scores must hold at least one request (shape [R, M] with R >= 1), got ",
              scores.sizes());
  at::Tensor out = at::empty({M}, scores.options());
  if (M == 0) return out;
  const float* x = scores.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  constexpr int64_t kCols = 2048;  // columns per task
  if (mode == 0) {
    at::parallel_for(0, (M + kCols - 1) / kCols, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * kCols, w = std::min(kCols, M - j0);
        max_columns(o + j0, x + j0, M, R, w);
      }
    });
    return out;
  }
  const int64_t W = aten_float_vec_width();
  const float Rf = static_cast<float>(R);
  if (M == 1 && R >= W) {
    o[0] = (0.0f + inner_sum(x, R, W)) / Rf;
    return out;
  }
  // Columns [0, A) in cascade order, [A, M) in ilp4 order (see above).
  const int64_t A = M >= W ? M / (4 * W) * (4 * W) : M / 4 * 4;
  const bool in_order = R < (int64_t(1) << std::max<int64_t>(4, ceil_log2(R) / 4));  // no level flush
  at::parallel_for(0, (A + kCols - 1) / kCols, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kCols, w = std::min(kCols, A - j0);
      if (in_order) {
        mean_columns_in_order(o + j0, x + j0, M, R, w, Rf);
      } else {
        cascade_columns(o + j0, x + j0, M, 1, R, w);
        finish_mean(o + j0, w, Rf);
      }
    }
  });
  if (A < M) {
    ilp4_columns(o + A, x + A, M, R, M - A);
    finish_mean(o + A, M - A, Rf);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
namespace {
template <typename Select>
at::Tensor order_statistics_impl(const at::Tensor& values, int64_t k, Select select) {
  constexpr const char* op = "kne::order_statistics";
  detail::check_tensor(values, op, "values", {at::kFloat}, 1);
  const int64_t M = values.numel();
  TORCH_CHECK(M >= 1, op, ": values is empty; the order statistics of nothing are undefined");
  TORCH_CHECK(k >= 0 && k < M, op, ": k must lie in [0, ", M, ") (0-based rank among values.numel() = ", M,
              " values), got ", k);
  const int64_t k1 = std::min(k + 1, M - 1);
  uint32_t ka = 0, kb = 0;
  select(values.const_data_ptr<float>(), M, k, k1, &ka, &kb);
  at::Tensor out = at::empty({2}, values.options());
  float* o = out.mutable_data_ptr<float>();
  o[0] = float_of(ka);
  o[1] = float_of(kb);
  return out;
}
}  // namespace

at::Tensor order_statistics(const at::Tensor& values, int64_t k) {
  return order_statistics_impl(values, k, &select_pair);
}

at::Tensor detail::order_statistics_radix(const at::Tensor& values, int64_t k) {
  return order_statistics_impl(values, k, &radix_select);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> threshold_mask(const at::Tensor& values, double threshold, bool positive_only) {
  constexpr const char* op = "kne::threshold_mask";
  detail::check_tensor(values, op, "values", {at::kFloat}, 2);
  const int64_t L = values.size(0), D = values.size(1);
  at::Tensor mask = at::empty({L, D}, values.options().dtype(at::kBool));
  at::Tensor counts = at::empty({L}, values.options().dtype(at::kLong));
  // The threshold is a float32 value: torch compares a float32 tensor with a Python float in float32.
  const float thr = static_cast<float>(threshold);
  const float* v = values.const_data_ptr<float>();
  bool* m = mask.mutable_data_ptr<bool>();
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  if (L == 0) return {mask, counts};
  constexpr int64_t kSpan = 1 << 16;
  const int64_t spans = std::max<int64_t>(1, (D + kSpan - 1) / kSpan);
  const int64_t width = (D + spans - 1) / spans;
  auto fn = positive_only ? &mask_span<true> : &mask_span<false>;
  if (spans == 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
    at::parallel_for(0, L, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) cnt[r] = fn(m + r * D, v + r * D, D, thr);
    });
    return {mask, counts};
  }
  std::vector<int64_t> part(static_cast<size_t>(L * spans));
  at::parallel_for(0, L * spans, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / spans, s = t % spans;
      const int64_t c0 = std::min(D, s * width), c1 = std::min(D, c0 + width);
      part[t] = fn(m + r * D + c0, v + r * D + c0, c1 - c0, thr);
    }
  });
  for (int64_t r = 0; r < L; ++r) {
    int64_t s = 0;
    for (int64_t j = 0; j < spans; ++j) s += part[r * spans + j];
    cnt[r] = s;
  }
  return {mask, counts};
}

}  // namespace cpu
}  // namespace kne
