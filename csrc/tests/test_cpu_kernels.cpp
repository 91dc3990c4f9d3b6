// C++ tests of the kne::cpu kernels, called directly (no schema, no Python) against plain ATen
// expressions: random inputs, odd shapes, every dtype, edge cases, bad inputs. Run by ctest
// (CMakeLists.txt); exits non-zero on the first failing section's end with every failure printed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "kne_ops.h"

namespace {

int g_checks = 0, g_failures = 0;

#define KNE_EXPECT(cond, msg)                                                                  \
  do {                                                                                         \
    ++g_checks;                                                                                \
    if (!(cond)) {                                                                             \
      ++g_failures;                                                                            \
      std::ostringstream os_;                                                                  \
      os_ << msg;                                                                              \
      std::cerr << __FILE__ << ":" << __LINE__ << ": FAILED " #cond ": " << os_.str() << "\n"; \
    }                                                                                          \
  } while (0)

const std::vector<at::ScalarType> kFloats = {at::kFloat, at::kHalf, at::kBFloat16};

std::string name(at::ScalarType t) { return c10::toString(t); }

// max |a - b| / max(|b|, floor) with the worst index, in float64
double rel_err(const at::Tensor& a, const at::Tensor& b, double floor = 1e-30, int64_t* worst = nullptr) {
  at::Tensor ad = a.to(at::kDouble).reshape(-1), bd = b.to(at::kDouble).reshape(-1);
  if (ad.numel() == 0) return 0.0;
  at::Tensor diff = (ad - bd).abs();
  if (worst) *worst = diff.argmax().item<int64_t>();
  const double den = std::max(bd.abs().max().item<double>(), floor);
  return diff.max().item<double>() / den;
}

bool bit_equal(const at::Tensor& a, const at::Tensor& b, int64_t* first = nullptr) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const auto n = static_cast<size_t>(a.numel() * a.element_size());
  at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const bool eq = std::memcmp(ac.const_data_ptr(), bc.const_data_ptr(), n) == 0;
  if (!eq && first) {
    at::Tensor ne = (ac.view(-1) != bc.view(-1)) | (ac.view(-1).isnan() != bc.view(-1).isnan());
    at::Tensor nz = ne.nonzero();
    *first = nz.numel() ? nz[0][0].item<int64_t>() : -1;
  }
  return eq;
}

template <typename F>
void expect_error(F&& f, const std::string& needle, const std::string& what) {
  ++g_checks;
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos) {
      ++g_failures;
      std::cerr << "FAILED " << what << ": error message lacks '" << needle << "': " << msg << "\n";
    }
    return;
  }
  ++g_failures;
  std::cerr << "FAILED " << what << ": no error raised\n";
}

at::Tensor randn(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return at::randn(shape, at::kFloat).to(dtype);
}

// ------------------------------------------------------------------------------------------ conversions
void test_conversions() {
  using namespace kne::cpu::detail;
  // every bf16 / fp16 bit pattern -> float, against c10
  for (uint32_t h = 0; h < 65536; ++h) {
    c10::BFloat16 b;
    b.x = static_cast<uint16_t>(h);
    const float fb = BF16::load(static_cast<uint16_t>(h)), rb = static_cast<float>(b);
    c10::Half hf;
    hf.x = static_cast<uint16_t>(h);
    const float fh = F16::load(static_cast<uint16_t>(h)), rh = c10::detail::fp16_ieee_to_fp32_value(hf.x);
    KNE_EXPECT((std::isnan(fb) && std::isnan(rb)) || bits_from_f32(fb) == bits_from_f32(rb), "bf16 " << h);
    KNE_EXPECT((std::isnan(fh) && std::isnan(rh)) || bits_from_f32(fh) == bits_from_f32(rh), "fp16 " << h);
  }
  // float -> bf16/fp16 against ATen's .to() on random, special and halfway values
  at::Tensor x = at::cat({at::randn({200000}) * at::exp(at::randn({200000}) * 8),
                          at::tensor({0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e-8f, -6e-8f, 3e-5f,
                                      std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                                      std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min()})});
  // exact halfway points of bf16 and fp16 (round-to-nearest-even decides them)
  at::Tensor hb = (at::randint(0, 1 << 16, {20000}, at::kInt) * 65536 + 32768).view(at::kFloat);
  at::Tensor hh = (at::rand({20000}) * 60000).to(at::kHalf).to(at::kFloat);
  hh = hh + at::ones_like(hh) * 0;  // copies
  x = at::cat({x, hb.masked_fill(hb.isnan(), 1.0f), hh});
  const float* px = x.const_data_ptr<float>();
  at::Tensor rb = x.to(at::kBFloat16), rh = x.to(at::kHalf);
  const uint16_t* pb = static_cast<const uint16_t*>(rb.const_data_ptr());
  const uint16_t* ph = static_cast<const uint16_t*>(rh.const_data_ptr());
  int bad_b = 0, bad_h = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    bad_b += bf16_from_f32(px[i]) != pb[i];
    bad_h += f16_from_f32(px[i]) != ph[i];
  }
  KNE_EXPECT(bad_b == 0, bad_b << " float->bf16 mismatches");
  KNE_EXPECT(bad_h == 0, bad_h << " float->fp16 mismatches");
}

// ------------------------------------------------------------------------------------------ neuron_attribution_
void test_neuron_attribution() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {7, 1}, {1, 7}, {7, 4097}, {300, 33},
                                                           {1031, 257}, {4099, 5}, {513, 4100}};
  for (auto dtype : kFloats) {
    for (auto [N, D] : shapes) {
      for (int variant = 0; variant < 4; ++variant) {
        const bool use_seg = variant & 1, use_scale = variant & 2;
        at::Tensor a = randn({N, D}, dtype), g = randn({N, D}, dtype);
        const int64_t S = use_seg ? 5 : 1;
        at::Tensor seg = at::randint(0, S, {N}, at::kLong);
        at::Tensor scale = at::rand({N});
        const double sv = variant == 3 ? 0.37 : 1.0;
        at::Tensor out = at::randn({S, D});
        at::Tensor prod = a.to(at::kDouble) * g.to(at::kDouble) * sv;
        if (use_scale) prod = prod * scale.to(at::kDouble).unsqueeze(1);
        at::Tensor want = out.to(at::kDouble);
        if (use_seg) want.index_add_(0, seg, prod);
        else want[0] += prod.sum(0);
        kne::cpu::neuron_attribution_(out, a, g, use_seg ? std::optional<at::Tensor>(seg) : std::nullopt,
                                      use_scale ? std::optional<at::Tensor>(scale) : std::nullopt, sv);
        // fp32 accumulation of exact products: error ~ N * eps relative to sum |prod|
        at::Tensor mag = out.to(at::kDouble).abs() + (use_seg ? at::zeros_like(want).index_add_(0, seg, prod.abs())
                                                              : prod.abs().sum(0).unsqueeze(0));
        const double err = ((out.to(at::kDouble) - want).abs() / (mag + 1e-30)).max().item<double>();
        KNE_EXPECT(err < 1e-5, "neuron_attribution " << name(dtype) << " [" << N << "," << D << "] variant "
                                                   << variant << " rel err " << err);
      }
    }
  }
  // bad inputs
  at::Tensor a = randn({6, 4}), g = randn({6, 4}), out = at::zeros({1, 4});
  auto call = [&](at::Tensor o, at::Tensor x, at::Tensor y, std::optional<at::Tensor> s = std::nullopt,
                  std::optional<at::Tensor> sc = std::nullopt) { kne::cpu::neuron_attribution_(o, x, y, s, sc, 1.0); };
  expect_error([&] { call(out, a.to(at::kDouble), g.to(at::kDouble)); }, "act has dtype", "act float64");
  expect_error([&] { call(out, a, g.to(at::kHalf)); }, "same dtype", "mixed dtypes");
  expect_error([&] { call(out, a.t(), g.t()); }, "act is not contiguous", "non-contiguous act");
  expect_error([&] { call(out, a, randn({6, 5})); }, "same shape", "grad shape");
  expect_error([&] { call(at::zeros({1, 5}), a, g); }, "out must have shape", "out shape");
  expect_error([&] { call(at::zeros({1, 4}, at::kHalf), a, g); }, "out has dtype", "out dtype");
  expect_error([&] { call(at::zeros({2, 4}), a, g); }, "without segments", "S without segments");
  expect_error([&] { call(at::zeros({2, 4}), a, g, at::tensor({0, 1, 2, 0, 1, 0}, at::kLong)); },
               "segments[2] = 2 is out of range", "segment out of range");
  expect_error([&] { call(at::zeros({2, 4}), a, g, at::tensor({0, 1, -1, 0, 1, 0}, at::kLong)); },
               "out of range", "negative segment");
  expect_error([&] { call(at::zeros({2, 4}), a, g, at::zeros({6}, at::kInt)); }, "segments has dtype", "int32 segs");
  expect_error([&] { call(at::zeros({2, 4}), a, g, at::zeros({5}, at::kLong)); }, "segments must have shape",
               "segments length");
  expect_error([&] { call(out, a, g, std::nullopt, at::ones({5})); }, "scale must have shape", "scale length");
  expect_error([&] { call(out, a, g, std::nullopt, at::ones({6}, at::kDouble)); }, "scale has dtype", "scale dtype");
}

// ------------------------------------------------------------------------------------------ weight_attribution_
void test_weight_attribution() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {7, 1}, {1, 7}, {33, 4097}, {4097, 3},
                                                           {257, 1031}, {2, 70001}};
  for (auto dtype : kFloats) {
    for (auto [R, C] : shapes) {
      for (int64_t dim : {0, 1, -1}) {
        for (bool absolute : {false, true}) {
          at::Tensor w = randn({R, C}, dtype), g = randn({R, C}, dtype);
          const int64_t nd = dim < 0 ? dim + 2 : dim;
          at::Tensor out = at::randn({nd == 1 ? R : C});
          at::Tensor prod = w.to(at::kDouble) * g.to(at::kDouble);
          if (absolute) prod = prod.abs();
          at::Tensor want = out.to(at::kDouble) + prod.sum(nd);
          at::Tensor mag = out.to(at::kDouble).abs() + prod.abs().sum(nd);
          kne::cpu::weight_attribution_(out, w, g, dim, absolute);
          const double err = ((out.to(at::kDouble) - want).abs() / (mag + 1e-30)).max().item<double>();
          KNE_EXPECT(err < 1e-5, "weight_attribution " << name(dtype) << " [" << R << "," << C << "] dim " << dim
                                                       << " abs " << absolute << " rel err " << err);
        }
      }
    }
  }
  at::Tensor w = randn({5, 3}), g = randn({5, 3});
  at::Tensor o5 = at::zeros({5}), o3 = at::zeros({3});
  expect_error([&] { kne::cpu::weight_attribution_(o3, w, g, 1, false); }, "out must have shape [5]", "dim1 out");
  expect_error([&] { kne::cpu::weight_attribution_(o5, w, g, 0, false); }, "out must have shape [3]", "dim0 out");
  expect_error([&] { kne::cpu::weight_attribution_(o5, w, g, 2, false); }, "dim must be", "dim 2");
  expect_error([&] { kne::cpu::weight_attribution_(o5, w.to(at::kHalf), g, 1, false); }, "same dtype", "dtypes");
  expect_error([&] { at::Tensor t = o5.to(at::kDouble); kne::cpu::weight_attribution_(t, w, g, 1, false); },
               "out has dtype", "out dtype");
  expect_error([&] { kne::cpu::weight_attribution_(o3, w.t(), g.t(), 1, false); }, "weight is not contiguous",
               "non-contiguous");
  expect_error([&] { kne::cpu::weight_attribution_(o5, randn({5}), randn({5}), 1, false); }, "weight must be 2-D",
               "1-D weight");
}

// ------------------------------------------------------------------------------------------ ensemble_aggregate
void test_ensemble_aggregate() {
  for (int64_t R : {1, 2, 3, 4, 5, 7, 15, 16, 17, 33, 100, 257}) {
    for (int64_t M : {1, 2, 3, 5, 7, 8, 9, 31, 33, 64, 77, 100, 1000, 4097, 40000}) {
      at::Tensor s = at::randn({R, M}) * at::exp(at::randn({R, M}) * 3);
      at::Tensor mean = kne::cpu::ensemble_aggregate(s, 1);
      int64_t first = -1;
      KNE_EXPECT(bit_equal(mean, s.mean(0), &first),
                 "mean [" << R << "," << M << "] differs from torch at column " << first);
      at::Tensor mx = kne::cpu::ensemble_aggregate(s, 0);
      KNE_EXPECT(at::equal(mx, std::get<0>(s.max(0))), "max [" << R << "," << M << "]");
    }
  }
  // NaN propagates through max; -0.0 sums like torch
  at::Tensor s = at::randn({3, 10});
  s[1][4] = std::nanf("");
  KNE_EXPECT(std::isnan(kne::cpu::ensemble_aggregate(s, 0)[4].item<float>()), "max NaN");
  at::Tensor z = -at::zeros({3, 9});
  KNE_EXPECT(bit_equal(kne::cpu::ensemble_aggregate(z, 1), z.mean(0)), "mean of -0.0");
  expect_error([] { kne::cpu::ensemble_aggregate(at::randn({2, 3}), 2); }, "mode must be", "mode 2");
  expect_error([] { kne::cpu::ensemble_aggregate(at::randn({2, 3}, at::kDouble), 0); }, "scores has dtype", "f64");
  expect_error([] { kne::cpu::ensemble_aggregate(at::randn({0, 3}), 0); }, "at least one request", "R=0");
  expect_error([] { kne::cpu::ensemble_aggregate(at::randn({2, 3, 4}), 0); }, "scores must be 2-D", "3-D");
}

// ------------------------------------------------------------------------------------------ order_statistics
void check_order(const at::Tensor& v, int64_t k, const std::string& what) {
  const int64_t M = v.numel();
  at::Tensor got = kne::cpu::order_statistics(v, k);
  const float a = std::get<0>(at::kthvalue(v, k + 1)).item<float>();
  const float b = std::get<0>(at::kthvalue(v, std::min(k + 1, M - 1) + 1)).item<float>();
  for (int path = 0; path < 2; ++path) {
    if (path == 1) got = kne::cpu::detail::order_statistics_radix(v, k);
    const float ga = got[0].item<float>(), gb = got[1].item<float>();
    const bool ok =
        (ga == a || (std::isnan(ga) && std::isnan(a))) && (gb == b || (std::isnan(gb) && std::isnan(b)));
    KNE_EXPECT(ok, "order_statistics" << (path ? " (radix)" : "") << " " << what << " M=" << M << " k=" << k
                                      << ": got (" << ga << ", " << gb << ") want (" << a << ", " << b << ")");
    if (ga == 0.0f) KNE_EXPECT(!std::signbit(ga), "zero order statistic is +0.0 (" << what << ")");
    if (gb == 0.0f) KNE_EXPECT(!std::signbit(gb), "zero order statistic is +0.0 (" << what << ")");
  }
}

void test_order_statistics() {
  for (int64_t M : {1, 2, 3, 7, 100, 8192, 8193, 50000, 352256, 1000003}) {
    std::vector<std::pair<std::string, at::Tensor>> cases = {
        {"randn", at::randn({M})},
        {"ties", at::randint(-3, 4, {M}).to(at::kFloat)},
        {"all equal", at::full({M}, 0.25f)},
        {"zeros", at::where(at::rand({M}) < 0.5, at::zeros({M}), -at::zeros({M}))},
        {"wide", at::randn({M}) * at::exp(at::randn({M}) * 10)},
        {"dense bucket", 1.0f + at::rand({M}) * 1e-3f},
    };
    for (auto& [what, v] : cases) {
      for (int64_t k : {int64_t(0), M / 3, M / 2, M - 2, M - 1, (M * 99) / 100}) {
        if (k < 0 || k >= M) continue;
        check_order(v, k, what);
      }
    }
  }
  // infinities and NaN (torch sorts NaN last)
  at::Tensor v = at::randn({20000});
  v[5] = std::numeric_limits<float>::infinity();
  v[6] = -std::numeric_limits<float>::infinity();
  v[7] = std::nanf("");
  for (int64_t k : {0, 1, 19997, 19998, 19999}) check_order(v, k, "inf/nan");
  expect_error([] { kne::cpu::order_statistics(at::randn({5}), 5); }, "k must lie in [0, 5)", "k = M");
  expect_error([] { kne::cpu::order_statistics(at::randn({5}), -1); }, "k must lie", "k < 0");
  expect_error([] { kne::cpu::order_statistics(at::randn({0}), 0); }, "values is empty", "empty");
  expect_error([] { kne::cpu::order_statistics(at::randn({5}, at::kHalf), 0); }, "values has dtype", "fp16");
  expect_error([] { kne::cpu::order_statistics(at::randn({5, 2}), 0); }, "values must be 1-D", "2-D");
}

// ------------------------------------------------------------------------------------------ threshold_mask
void test_threshold_mask() {
  for (auto [L, D] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 7}, {7, 4097}, {64, 100}, {2, 200001},
                                                              {0, 5}, {5, 0}}) {
    at::Tensor v = at::randn({L, D});
    for (double thr : {-0.5, 0.0, 0.1, 1.7, 100.0}) {
      for (bool pos : {false, true}) {
        auto [mask, counts] = kne::cpu::threshold_mask(v, thr, pos);
        at::Tensor want = v > thr;
        if (pos) want = want & (v > 0);
        KNE_EXPECT(at::equal(mask, want), "mask [" << L << "," << D << "] thr " << thr << " pos " << pos);
        KNE_EXPECT(at::equal(counts, want.sum(1)), "counts [" << L << "," << D << "]");
        KNE_EXPECT(mask.scalar_type() == at::kBool && counts.scalar_type() == at::kLong, "result dtypes");
      }
    }
  }
  // the threshold is compared in float32 (0.1 rounds up to 0.1f: 0.1f > 0.1f is false)
  at::Tensor v = at::full({1, 3}, 0.1f);
  KNE_EXPECT(std::get<1>(kne::cpu::threshold_mask(v, 0.1, false))[0].item<int64_t>() == 0, "float32 threshold");
  expect_error([] { kne::cpu::threshold_mask(at::randn({3}), 0.0, false); }, "values must be 2-D", "1-D");
}

// ------------------------------------------------------------------------------------------ ensemble_adamw_step_
// The torch kernel (ensemble_adamw_step_torch, kne_kernels/ops/ensemble_adamw_step.py) in ATen.
// ieee_sqrt: take the correctly rounded square root (ATen's float32 sqrt goes through MKL VML,
// which is not correctly rounded; the kernel's is), so that every other step can be compared bit
// for bit.
void reference_adamw(at::Tensor& weight, const at::Tensor& index, const at::Tensor& grad, at::Tensor& delta,
                     at::Tensor& m, at::Tensor& v, const at::Tensor& base, int64_t step, double lr, double scale,
                     int64_t dim, double b1, double b2, double eps, double wd, bool ieee_sqrt) {
  if (wd != 0.0) delta.mul_(1 - lr * wd);
  m.lerp_(grad, 1 - b1);
  v.mul_(b2).addcmul_(grad, grad, 1 - b2);
  const double bc1 = 1 - std::pow(b1, double(step)), bc2 = 1 - std::pow(b2, double(step));
  at::Tensor root = ieee_sqrt ? v.to(at::kDouble).sqrt().to(at::kFloat) : v.sqrt();
  at::Tensor denom = (root / std::sqrt(bc2)).add_(eps);
  delta.addcdiv_(m, denom, -(lr / bc1));
  weight.index_copy_(dim, index, (base.to(at::kFloat) + scale * delta).to(weight.scalar_type()));
}

void test_adamw() {
  struct Case { int64_t O, I, K, dim; };
  const std::vector<Case> cases = {{41, 19, 3, 0}, {41, 19, 5, 1}, {64, 256, 16, 0}, {256, 64, 16, 1},
                                   {7, 4097, 1, 0}, {4097, 7, 2, 1}, {300, 500, 37, 0}, {500, 300, 37, 1}};
  for (auto dtype : kFloats) {
    for (const auto& c : cases) {
      for (double beta1 : {0.9, 0.3}) {
        for (double wd : {0.0, 0.01}) {
          const int64_t limit = c.dim == 0 ? c.O : c.I;
          at::Tensor index = at::randperm(limit, at::kLong).slice(0, 0, c.K).contiguous();
          const std::vector<int64_t> shape = c.dim == 0 ? std::vector<int64_t>{c.K, c.I} : std::vector<int64_t>{c.O, c.K};
          at::Tensor w0 = randn({c.O, c.I}, dtype);
          at::Tensor base = w0.index_select(c.dim, index).contiguous();
          at::Tensor grad = at::randn(shape), d0 = at::randn(shape) * 0.01, m0 = at::randn(shape) * 0.1,
                     v0 = at::rand(shape) * 0.01;
          std::vector<at::Tensor> got = {w0.clone(), d0.clone(), m0.clone(), v0.clone()};
          std::vector<at::Tensor> want = {w0.clone(), d0.clone(), m0.clone(), v0.clone()};
          std::vector<at::Tensor> plain = {w0.clone(), d0.clone(), m0.clone(), v0.clone()};
          const int64_t step = 3;
          kne::cpu::ensemble_adamw_step_(got[0], index, grad, got[1], got[2], got[3], base, step, 1e-2, 0.7, c.dim,
                                         beta1, 0.999, 1e-8, wd);
          reference_adamw(want[0], index, grad, want[1], want[2], want[3], base, step, 1e-2, 0.7, c.dim, beta1, 0.999,
                          1e-8, wd, true);
          reference_adamw(plain[0], index, grad, plain[1], plain[2], plain[3], base, step, 1e-2, 0.7, c.dim, beta1,
                          0.999, 1e-8, wd, false);
          std::ostringstream what;
          what << "adamw " << name(dtype) << " [" << c.O << "," << c.I << "] K=" << c.K << " dim=" << c.dim
               << " beta1=" << beta1 << " wd=" << wd;
          // ATen's vector loop covers all elements when the compact size is a multiple of 16: bit-exact
          const bool exact = (shape[0] * shape[1]) % 16 == 0 && at::get_num_threads() == 1;
          const char* names[] = {"weight", "delta", "exp_avg", "exp_avg_sq"};
          for (int i = 0; i < 4; ++i) {
            int64_t first = -1;
            if (exact) {
              KNE_EXPECT(bit_equal(got[i], want[i], &first), what.str() << " " << names[i] << " differs at " << first);
            } else {
              const double tol = (i == 0 && dtype != at::kFloat) ? (dtype == at::kHalf ? 1e-3 : 8e-3) : 1e-6;
              int64_t worst = -1;
              const double err = rel_err(got[i], want[i], 1e-30, &worst);
              KNE_EXPECT(err <= tol, what.str() << " " << names[i] << " rel err " << err << " at " << worst);
            }
            // against the plain torch kernel (MKL's sqrt): within float rounding
            const double tol = (i == 0 && dtype != at::kFloat) ? (dtype == at::kHalf ? 1e-3 : 8e-3) : 1e-6;
            int64_t worst = -1;
            const double err = rel_err(got[i], plain[i], 1e-30, &worst);
            KNE_EXPECT(err <= tol, what.str() << " " << names[i] << " vs torch: rel err " << err << " at " << worst);
          }
          // nothing outside the ensemble changed
          at::Tensor keep = at::ones({limit}, at::kBool).index_fill_(0, index, false);
          at::Tensor outside_got = c.dim == 0 ? got[0].index({keep}) : got[0].index({at::indexing::Slice(), keep});
          at::Tensor outside_w0 = c.dim == 0 ? w0.index({keep}) : w0.index({at::indexing::Slice(), keep});
          KNE_EXPECT(bit_equal(outside_got, outside_w0), what.str() << ": rows/columns outside the index changed");
        }
      }
    }
  }
  // bad inputs
  at::Tensor w = randn({10, 4}), idx = at::tensor({1, 5}, at::kLong), g = at::randn({2, 4}), d = at::zeros({2, 4}),
             m = at::zeros({2, 4}), v = at::zeros({2, 4}), base = randn({2, 4});
  auto call = [&](at::Tensor w_, at::Tensor i_, at::Tensor g_, at::Tensor d_, at::Tensor b_, int64_t dim = 0,
                  int64_t step = 1) {
    kne::cpu::ensemble_adamw_step_(w_, i_, g_, d_, m, v, b_, step, 1e-3, 1.0, dim, 0.9, 0.999, 1e-8, 0.0);
  };
  expect_error([&] { call(w, at::tensor({1, 10}, at::kLong), g, d, base); }, "index[1] = 10 is out of range",
               "index range");
  expect_error([&] { call(w, at::tensor({1, 1}, at::kLong), g, d, base); }, "twice", "duplicate index");
  expect_error([&] { call(w, idx.to(at::kInt), g, d, base); }, "index has dtype", "int32 index");
  expect_error([&] { call(w, idx, at::randn({3, 4}), d, base); }, "grad must have shape", "grad shape");
  expect_error([&] { call(w, idx, g.to(at::kHalf), d, base); }, "grad has dtype", "grad dtype");
  expect_error([&] { call(w, idx, g, d, base.to(at::kHalf)); }, "base has dtype", "base dtype");
  expect_error([&] { call(w, idx, g, d, base, 2); }, "dim must be", "dim 2");
  expect_error([&] { call(w, idx, g, d, base, 0, 0); }, "step counts from 1", "step 0");
  expect_error([&] { call(w, idx, g, at::zeros({4, 2}).t(), base); }, "delta is not contiguous", "delta strides");
  // tensors written in place must not alias another argument
  expect_error([&] { call(w, idx, g, m, base); }, "delta and exp_avg share memory", "delta aliases exp_avg");
  expect_error([&] { call(w, idx, g, g, base); }, "delta and grad share memory", "delta aliases grad");
  expect_error([&] { call(w, idx, g, d, w.narrow(0, 2, 2)); }, "weight and base share memory", "base inside weight");
  {
    at::Tensor out = at::zeros({1, 4});
    expect_error([&] { kne::cpu::neuron_attribution_(out, out, out, std::nullopt, std::nullopt, 1.0); },
                 "out and act share memory", "neuron_attribution out aliases act");
    at::Tensor wa = at::randn({4, 4});
    at::Tensor row = wa[0];
    expect_error([&] { kne::cpu::weight_attribution_(row, wa, at::randn({4, 4}), 0, false); },
                 "out and weight share memory", "weight_attribution out aliases weight");
  }
}

// ------------------------------------------------------------------------------------------ nullspace_project_
// delta -= (delta @ B) @ B^T in float64 (B orthonormal), rows written as base + scale * delta.
void test_nullspace_project() {
  struct Case { int64_t K, n, r; };
  for (const Case c : {Case{1, 1, 0}, Case{3, 77, 20}, Case{7, 130, 65}, Case{2, 31, 31}, Case{9, 257, 1}}) {
    for (const auto dtype : kFloats) {
      at::Tensor q = std::get<0>(at::linalg_qr(at::randn({c.n, std::max<int64_t>(c.r, 1)}, at::kDouble)));
      at::Tensor basis = q.narrow(1, 0, c.r).to(at::kFloat).contiguous();
      const int64_t out = 2 * c.K + 3;
      at::Tensor weight = at::randn({out, c.n}).to(dtype);
      at::Tensor index = at::randperm(out, at::kLong).narrow(0, 0, c.K).contiguous();
      at::Tensor delta = at::randn({c.K, c.n});
      at::Tensor base = weight.index_select(0, index).contiguous();
      at::Tensor want_d = delta.to(at::kDouble) - delta.to(at::kDouble).matmul(basis.to(at::kDouble))
                                                     .matmul(basis.to(at::kDouble).t());
      at::Tensor got_w = weight.clone(), got_d = delta.clone();
      kne::cpu::nullspace_project_(got_w, index, got_d, basis, base, 0.37);
      const double err = (got_d.to(at::kDouble) - want_d).abs().max().item<double>() /
                         std::max(delta.abs().max().item<double>(), 1e-30);
      const double tol = 8.0 * static_cast<double>(c.n + c.r) * 1.1920929e-7;
      KNE_EXPECT(err <= tol, "nullspace_project " << name(dtype) << " [" << c.K << "," << c.n << "] r=" << c.r
                                                  << ": delta error " << err << " > " << tol);
      at::Tensor want_rows = (base.to(at::kFloat) + 0.37 * got_d).to(dtype);
      int64_t first = -1;
      KNE_EXPECT(bit_equal(got_w.index_select(0, index), want_rows, &first),
                 "nullspace_project " << name(dtype) << ": rows differ from base + scale * delta at " << first);
      at::Tensor others = at::ones({out}, at::kBool).index_fill_(0, index, false);
      KNE_EXPECT(at::equal(got_w.index({others}), weight.index({others})),
                 "nullspace_project " << name(dtype) << ": rows outside the ensemble were written");
    }
  }
  bool threw = false;
  try {
    at::Tensor w = at::zeros({4, 8}), d = at::zeros({2, 8}), b = at::zeros({7, 2}), base = at::zeros({2, 8});
    at::Tensor idx = at::arange(2, at::kLong);
    kne::cpu::nullspace_project_(w, idx, d, b, base, 1.0);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("basis must be") != std::string::npos;
  }
  KNE_EXPECT(threw, "nullspace_project: a basis of the wrong height must be refused naming basis");
}

void run_all(const char* label) {
  const int before = g_failures;
  test_neuron_attribution();
  test_weight_attribution();
  test_ensemble_aggregate();
  test_order_statistics();
  test_threshold_mask();
  test_adamw();
  test_nullspace_project();
  std::cout << label << ": " << (g_failures - before) << " failures\n";
}

}  // namespace

int main() {
  at::manual_seed(20240607);
  test_conversions();
  at::set_num_threads(1);
  run_all("1 thread");
  at::set_num_threads(2);
  run_all("2 threads");
  std::cout << g_checks << " checks, " << g_failures << " failures\n";
  return g_failures == 0 ? 0 : 1;
}
