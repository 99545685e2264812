// Schemas of the ampipe dispatch/combine ops: torch.ops.ampipe.*.
//
// Kernels: cpu/dispatch_cpu.cpp (CPU) and cuda/dispatch_cuda.cu (CUDA, when compiled).
// Fake (meta) kernels and autograd are registered from Python (py/ampipe/ops/registration.py)
// right after the library is loaded, so the formulas live next to the reference they match.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "checks.h"

namespace ampipe {
namespace {
std::atomic<bool>& sync_checks_flag() {
  static std::atomic<bool> flag{[] {
    const char* v = std::getenv("AMPIPE_OPS_CHECK");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }()};
  return flag;
}
}  // namespace

bool sync_checks_enabled() { return sync_checks_flag().load(std::memory_order_relaxed); }
}  // namespace ampipe

TORCH_LIBRARY(ampipe, m) {
  // Buffer row of every (token, choice) slot, ranked inside an expert in (k, t) order, and
  // the rows each expert keeps. capacity=None is dropless.
  m.def("make_row_map(Tensor indices, int num_experts, int? capacity=None) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // buffer[row_map[t, k]] = x[t]; rows no slot maps to are zero.
  m.def("permute(Tensor x, Tensor row_map, SymInt num_rows) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // out[t] = sum_k gates[t, k] * buffer[row_map[t, k]] (weight 1 without gates).
  m.def("unpermute(Tensor buffer, Tensor row_map, Tensor? gates=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Fused backward of unpermute with gates: (grad_buffer, grad_gates).
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor buffer, Tensor row_map, Tensor gates) -> "
      "(Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Turns the CUDA kernels' host-side index checks on or off; returns the previous setting.
  m.def("_set_sync_checks(bool enabled) -> bool",
        [](bool enabled) { return ampipe::sync_checks_flag().exchange(enabled); });
}
