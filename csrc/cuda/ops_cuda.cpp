// kne::cuda::* (declared in kne_ops.h, registered for the CUDA dispatch key in registration.cpp):
// validation, device guard, current stream, output allocation, then the raw-pointer launchers of
// the .cu files (launchers.h). Compiled by the host compiler: ATen headers live here only, so the
// .cu translation units stay small and fast to build.
//
// One section per op, in the order of kne_ops.h. Semantics: kne_kernels/ops/<op module>.py. Inputs
// must be contiguous CUDA tensors on one device; nothing is copied or cast silently (the public
// functions of kne_kernels give friendlier errors first).
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "kne_ops.h"
#include "launchers.h"

namespace kne {
namespace cuda {
namespace {

using launch::DType;

void check_tensor(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "kne::", op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "kne::", op, ": all tensors must be on one device; ", name, " is on ",
              t.device(), ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), "kne::", op, ": ", name, " must be contiguous (shape ", t.sizes(),
              ", strides ", t.strides(), "): pass ", name, ".contiguous()");
}

// torch's Python names of the dtypes the ops take (c10::toString says Float, Long, ...).
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(t);
  }
}

void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "kne::", op, ": ", name, " must be ", dtype_name(want), ", got ",
              dtype_name(t.scalar_type()));
}

DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "kne::", op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  dtype_name(t.scalar_type()));
  }
  return DType::kFloat32;  // unreachable
}

void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "kne::", op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

// `written` (written in place by the op) shares no memory with `other` (host-side, no sync).
void check_no_overlap(const at::Tensor& written, const char* wname, const at::Tensor& other, const char* oname,
                      const char* op) {
  if (written.numel() == 0 || other.numel() == 0) return;
  TORCH_CHECK(at::get_overlap_status(written, other) == at::MemOverlapStatus::No, "kne::", op, ": ", wname, " and ",
              oname, " share memory; kne::", op, " writes ", wname, " in place, so it must not alias another ",
              "argument (pass ", oname, ".clone())");
}

}  // namespace

void neuron_attribution_(at::Tensor& out, const at::Tensor& act, const at::Tensor& grad,
                         const std::optional<at::Tensor>& segments, const std::optional<at::Tensor>& scale,
                         double scale_value) {
  constexpr const char* op = "neuron_attribution_";
  const at::Device device = out.device();
  check_tensor(out, op, "out", device);
  check_tensor(act, op, "act", device);
  check_tensor(grad, op, "grad", device);
  check_dtype(out, op, "out", at::kFloat);
  const DType dtype = float_dtype(act, op, "act");
  TORCH_CHECK(grad.scalar_type() == act.scalar_type(), "kne::", op, ": act (", dtype_name(act.scalar_type()),
              ") and grad (", dtype_name(grad.scalar_type()), ") must have the same dtype");
  TORCH_CHECK(act.dim() == 2, "kne::", op, ": act must be 2-D [N, D], got shape ", act.sizes());
  check_shape(grad, op, "grad", act.sizes());
  const int64_t N = act.size(0), D = act.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == D, "kne::", op, ": out must be [S, D=", D, "], got shape ",
              out.sizes());
  const int64_t S = out.size(0);
  const int64_t* seg_ptr = nullptr;
  if (segments.has_value()) {
    check_tensor(*segments, op, "segments", device);
    check_dtype(*segments, op, "segments", at::kLong);
    check_shape(*segments, op, "segments", {N});
    seg_ptr = segments->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(S == 1, "kne::", op, ": without segments out must be [1, D], got shape ", out.sizes());
  }
  const float* scale_ptr = nullptr;
  if (scale.has_value()) {
    check_tensor(*scale, op, "scale", device);
    check_dtype(*scale, op, "scale", at::kFloat);
    check_shape(*scale, op, "scale", {N});
    scale_ptr = scale->data_ptr<float>();
  }
  check_no_overlap(out, "out", act, "act", op);
  check_no_overlap(out, "out", grad, "grad", op);
  if (seg_ptr != nullptr) check_no_overlap(out, "out", *segments, "segments", op);
  if (scale_ptr != nullptr) check_no_overlap(out, "out", *scale, "scale", op);
  if (N == 0 || D == 0 || S == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch::neuron_attribution(out.data_ptr<float>(), act.data_ptr(), grad.data_ptr(), dtype,
                                                   seg_ptr, scale_ptr, static_cast<float>(scale_value), N, D, S,
                                                   c10::cuda::getCurrentCUDAStream()));
}

void weight_attribution_(at::Tensor& out, const at::Tensor& weight, const at::Tensor& grad, int64_t dim,
                         bool absolute) {
  constexpr const char* op = "weight_attribution_";
  const at::Device device = out.device();
  check_tensor(out, op, "out", device);
  check_tensor(weight, op, "weight", device);
  check_tensor(grad, op, "grad", device);
  check_dtype(out, op, "out", at::kFloat);
  const DType dtype = float_dtype(weight, op, "weight");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "kne::", op, ": weight (",
              dtype_name(weight.scalar_type()), ") and grad (", dtype_name(grad.scalar_type()),
              ") must have the same dtype");
  TORCH_CHECK(weight.dim() == 2, "kne::", op, ": weight must be 2-D [R, C], got shape ", weight.sizes());
  check_shape(grad, op, "grad", weight.sizes());
  TORCH_CHECK(dim == 0 || dim == 1, "kne::", op, ": dim must be 0 (per column) or 1 (per row), got ", dim);
  const int64_t R = weight.size(0), C = weight.size(1);
  check_shape(out, op, "out", {dim == 0 ? C : R});
  check_no_overlap(out, "out", weight, "weight", op);
  check_no_overlap(out, "out", grad, "grad", op);
  if (R == 0 || C == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch::weight_attribution(out.data_ptr<float>(), weight.data_ptr(), grad.data_ptr(), dtype,
                                                   static_cast<int>(dim), absolute, R, C,
                                                   c10::cuda::getCurrentCUDAStream()));
}

at::Tensor ensemble_aggregate(const at::Tensor& scores, int64_t mode) {
  constexpr const char* op = "ensemble_aggregate";
  check_tensor(scores, op, "scores", scores.device());
  check_dtype(scores, op, "scores", at::kFloat);
  TORCH_CHECK(scores.dim() == 2, "kne::", op, ": scores must be 2-D [R, M], got shape ", scores.sizes());
  TORCH_CHECK(mode == 0 || mode == 1, "kne::", op, ": mode must be 0 (max) or 1 (mean), got ", mode);
  const int64_t R = scores.size(0), M = scores.size(1);
  TORCH_CHECK(R > 0, "kne::", op, ": scores must have at least one row (R > 0)");
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty({M}, scores.options());
  if (M == 0) return out;
  C10_CUDA_CHECK(launch::ensemble_aggregate(out.data_ptr<float>(), scores.data_ptr<float>(),
                                                   static_cast<int>(mode), R, M,
                                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor order_statistics(const at::Tensor& values, int64_t k) {
  constexpr const char* op = "order_statistics";
  check_tensor(values, op, "values", values.device());
  check_dtype(values, op, "values", at::kFloat);
  TORCH_CHECK(values.dim() == 1, "kne::", op, ": values must be 1-D [M], got shape ", values.sizes());
  const int64_t M = values.size(0);
  TORCH_CHECK(M > 0, "kne::", op, ": values is empty");
  TORCH_CHECK(k >= 0 && k < M, "kne::", op, ": k must lie in [0, M=", M, "), got ", k);
  const int64_t k1 = std::min(k + 1, M - 1);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({2}, values.options());
  at::Tensor hist = at::empty({launch::kOrderStatisticsHistogramWords}, values.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch::order_statistics(out.data_ptr<float>(), values.data_ptr<float>(), M, k, k1,
                                                 reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                                                 c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> threshold_mask(const at::Tensor& values, double threshold, bool positive_only) {
  constexpr const char* op = "threshold_mask";
  check_tensor(values, op, "values", values.device());
  check_dtype(values, op, "values", at::kFloat);
  TORCH_CHECK(values.dim() == 2, "kne::", op, ": values must be 2-D [L, D], got shape ", values.sizes());
  const int64_t L = values.size(0), D = values.size(1);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor mask = at::empty({L, D}, values.options().dtype(at::kBool));
  at::Tensor counts = at::empty({L}, values.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch::threshold_mask(mask.data_ptr<bool>(), counts.data_ptr<int64_t>(),
                                               values.data_ptr<float>(), static_cast<float>(threshold),
                                               positive_only, L, D, c10::cuda::getCurrentCUDAStream()));
  return {mask, counts};
}

void ensemble_adamw_step_(at::Tensor& weight, const at::Tensor& index, const at::Tensor& grad, at::Tensor& delta,
                          at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& base, int64_t step,
                          double lr, double scale, int64_t dim, double beta1, double beta2, double eps,
                          double weight_decay) {
  constexpr const char* op = "ensemble_adamw_step_";
  const at::Device device = weight.device();
  check_tensor(weight, op, "weight", device);
  const DType dtype = float_dtype(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2, "kne::", op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  TORCH_CHECK(dim == 0 || dim == 1, "kne::", op, ": dim must be 0 (rows) or 1 (columns), got ", dim);
  check_tensor(index, op, "index", device);
  check_dtype(index, op, "index", at::kLong);
  TORCH_CHECK(index.dim() == 1, "kne::", op, ": index must be 1-D [K], got shape ", index.sizes());
  const int64_t out_features = weight.size(0), in_features = weight.size(1), K = index.size(0);
  const std::vector<int64_t> compact = dim == 0 ? std::vector<int64_t>{K, in_features}
                                                : std::vector<int64_t>{out_features, K};
  const std::pair<const char*, const at::Tensor*> state[] = {
      {"grad", &grad}, {"delta", &delta}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : state) {
    check_tensor(*t, op, name, device);
    check_dtype(*t, op, name, at::kFloat);
    check_shape(*t, op, name, compact);
  }
  check_tensor(base, op, "base", device);
  check_dtype(base, op, "base", weight.scalar_type());
  check_shape(base, op, "base", compact);
  TORCH_CHECK(step >= 1, "kne::", op, ": step counts from 1, got ", step);
  // The tensors written in place alias nothing. Index range and uniqueness are the caller's
  // (kne_kernels.ensemble_adamw_step_ checks them once per call; here it would cost a device sync).
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"weight", &weight}, {"delta", &delta}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq},
      {"index", &index},   {"grad", &grad},   {"base", &base}};
  for (size_t i = 0; i < 4; ++i) {
    for (size_t j = i + 1; j < 7; ++j) {
      check_no_overlap(*args[i].second, args[i].first, *args[j].second, args[j].first, op);
    }
  }
  if (K == 0 || out_features == 0 || in_features == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch::ensemble_adamw_step(
      weight.data_ptr(), dtype, index.data_ptr<int64_t>(), grad.data_ptr<float>(), delta.data_ptr<float>(),
      exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), base.data_ptr(), out_features, in_features, K,
      static_cast<int>(dim), step, lr, scale, beta1, beta2, eps, weight_decay, c10::cuda::getCurrentCUDAStream()));
}

void nullspace_project_(at::Tensor& weight, const at::Tensor& index, at::Tensor& delta, const at::Tensor& basis,
                        const at::Tensor& base, double scale) {
  constexpr const char* op = "nullspace_project_";
  const at::Device device = weight.device();
  check_tensor(weight, op, "weight", device);
  const DType dtype = float_dtype(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2, "kne::", op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  check_tensor(index, op, "index", device);
  check_dtype(index, op, "index", at::kLong);
  TORCH_CHECK(index.dim() == 1, "kne::", op, ": index must be 1-D [K], got shape ", index.sizes());
  const int64_t K = index.size(0), n = weight.size(1);
  check_tensor(delta, op, "delta", device);
  check_dtype(delta, op, "delta", at::kFloat);
  check_shape(delta, op, "delta", {K, n});
  check_tensor(basis, op, "basis", device);
  check_dtype(basis, op, "basis", at::kFloat);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == n, "kne::", op, ": basis must be [in=", n, ", r], got shape ",
              basis.sizes());
  check_tensor(base, op, "base", device);
  check_dtype(base, op, "base", weight.scalar_type());
  check_shape(base, op, "base", {K, n});
  if (K == 0 || n == 0) return;
  const int64_t r = basis.size(1);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor coef = at::empty({K, std::max<int64_t>(r, 1)}, delta.options());
  C10_CUDA_CHECK(launch::nullspace_project(weight.data_ptr(), dtype, index.data_ptr<int64_t>(), delta.data_ptr<float>(),
                                           basis.data_ptr<float>(), coef.data_ptr<float>(), base.data_ptr(), K, n, r,
                                           static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace cuda
}  // namespace kne
