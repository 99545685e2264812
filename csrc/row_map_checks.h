// Data checks of expert ids and row maps, on host memory. The CPU kernels run them on every
// call; the CUDA kernels run them on a host copy when AMPIPE_OPS_CHECK=1 (a synchronising
// debug mode), so both devices raise the same IndexError naming the same slot.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace ampipe {

// Every expert id in [0, num_experts). `indices` is contiguous int64 on the host.
inline void check_expert_ids(const at::Tensor& indices, int64_t num_experts) {
  const int64_t K = indices.size(1);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < indices.numel(); ++s) {
    TORCH_CHECK_INDEX(idx[s] >= 0 && idx[s] < num_experts, "ampipe.make_row_map: indices[",
                      s / K, ", ", s % K, "] = ", idx[s], " is out of range [0, num_experts=",
                      num_experts, ")");
  }
}

// inverse[r] = the flat slot t*K+k that row_map sends to row r, or -1. Rejects entries
// outside [-1, num_rows) and two slots sharing one row, naming the slot. `row_map` is
// contiguous int64 on the host.
inline std::vector<int64_t> inverse_map(const char* op, const at::Tensor& row_map,
                                        int64_t num_rows) {
  const int64_t K = row_map.size(1);
  const int64_t n = row_map.numel();
  const int64_t* rm = row_map.const_data_ptr<int64_t>();
  std::vector<int64_t> inverse(static_cast<size_t>(num_rows), -1);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t r = rm[s];
    if (r == -1) continue;
    TORCH_CHECK_INDEX(r >= 0 && r < num_rows, "ampipe.", op, ": row_map[", s / K, ", ", s % K,
                      "] = ", r, " is out of range [-1, ", num_rows, ")");
    TORCH_CHECK_INDEX(inverse[r] == -1, "ampipe.", op, ": row_map[", s / K, ", ", s % K,
                      "] and row_map[", inverse[r] / K, ", ", inverse[r] % K,
                      "] both map to row ", r,
                      " (rows must be distinct, as make_row_map makes them)");
    inverse[r] = s;
  }
  return inverse;
}

}  // namespace ampipe
