// The one op registration of the C++ library: CPU kernels (always) and CUDA kernels (builds with
// KNE_WITH_CUDA) for the schemas that kne_kernels/ops/<op module>.py define with torch.library.
// Registering an implementation before Python defines the schema is allowed by the dispatcher.
// Every op of the Python registry must be here: tests/ops/test_registry.py checks the CPU
// kernels, .ci/cuda_build.sh the CUDA ones.
#include <torch/library.h>

#include "kne_ops.h"

#define KNE_REGISTER(ns)                                                 \
  m.impl("neuron_attribution_", &kne::ns::neuron_attribution_);          \
  m.impl("weight_attribution_", &kne::ns::weight_attribution_);          \
  m.impl("ensemble_aggregate", &kne::ns::ensemble_aggregate);            \
  m.impl("order_statistics", &kne::ns::order_statistics);                \
  m.impl("threshold_mask", &kne::ns::threshold_mask);                    \
  m.impl("ensemble_adamw_step_", &kne::ns::ensemble_adamw_step_);        \
  m.impl("nullspace_project_", &kne::ns::nullspace_project_);

TORCH_LIBRARY_IMPL(kne, CPU, m) { KNE_REGISTER(cpu) }

#ifdef KNE_WITH_CUDA
TORCH_LIBRARY_IMPL(kne, CUDA, m) { KNE_REGISTER(cuda) }
#endif
