// kne C++ kernels: declarations shared by the CPU and CUDA implementations, the op registration
// (registration.cpp) and the C++ tests. Semantics: kne_kernels/ops/<op module>.py (the schema and
// the pure-torch kernel every implementation reproduces); the kernels: cpu/<op module>.cpp and
// cuda/<op module>.cu (plus the ATen side of the CUDA ones in cuda/ops_cuda.cpp). Only ATen headers: no Python.h, so the
// same sources build as a Python-loadable library (setup.py) and against libtorch (CMake).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace kne {

#define KNE_DECLARE_OPS                                                                              \
  void neuron_attribution_(at::Tensor& out, const at::Tensor& act, const at::Tensor& grad,           \
                           const std::optional<at::Tensor>& segments,                              \
                           const std::optional<at::Tensor>& scale, double scale_value);            \
  void weight_attribution_(at::Tensor& out, const at::Tensor& weight, const at::Tensor& grad,        \
                           int64_t dim, bool absolute);                                             \
  at::Tensor ensemble_aggregate(const at::Tensor& scores, int64_t mode);                            \
  at::Tensor order_statistics(const at::Tensor& values, int64_t k);                                 \
  std::tuple<at::Tensor, at::Tensor> threshold_mask(const at::Tensor& values, double threshold,     \
                                                    bool positive_only);                            \
  void ensemble_adamw_step_(at::Tensor& weight, const at::Tensor& index, const at::Tensor& grad,     \
                            at::Tensor& delta, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,         \
                            const at::Tensor& base, int64_t step, double lr, double scale,          \
                            int64_t dim, double beta1, double beta2, double eps,                    \
                            double weight_decay);                                                   \
  void nullspace_project_(at::Tensor& weight, const at::Tensor& index, at::Tensor& delta,             \
                          const at::Tensor& basis, const at::Tensor& base, double scale);

namespace cpu {
KNE_DECLARE_OPS
}  // namespace cpu

#ifdef KNE_WITH_CUDA
namespace cuda {
KNE_DECLARE_OPS
}  // namespace cuda
#endif

#undef KNE_DECLARE_OPS

}  // namespace kne
