// Metadata checks shared by the CPU and CUDA implementations of the ampipe ops.
//
// Every check runs before any memory is touched. The wording and exception types match
// py/ampipe/ops/validate.py: ValueError for shapes and sizes (TORCH_CHECK_VALUE), TypeError
// for dtypes (TORCH_CHECK_TYPE), IndexError for index values (TORCH_CHECK_INDEX).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

namespace ampipe {

// Whether the CUDA kernels also validate index values on the host (synchronising). Starts
// from AMPIPE_OPS_CHECK=1; toggled by torch.ops.ampipe._set_sync_checks. Defined in
// registration.cpp.
bool sync_checks_enabled();

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_make_row_map(const at::Tensor& indices, int64_t num_experts,
                               std::optional<int64_t> capacity) {
  TORCH_CHECK_VALUE(indices.dim() == 2,
                    "ampipe.make_row_map: indices must be a 2-D [T, K] tensor, got ",
                    indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "ampipe.make_row_map: indices must be int64 or int32, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1, "ampipe.make_row_map: num_experts must be >= 1, got ",
                    num_experts);
  TORCH_CHECK_VALUE(!capacity.has_value() || *capacity >= 0,
                    "ampipe.make_row_map: capacity must be >= 0 or None, got ", *capacity);
}

inline void check_row_map(const char* op, const at::Tensor& row_map, const at::Device& device) {
  TORCH_CHECK_VALUE(row_map.dim() == 2, "ampipe.", op,
                    ": row_map must be a 2-D [T, K] tensor, got ", row_map.sizes());
  TORCH_CHECK_TYPE(row_map.scalar_type() == at::kLong, "ampipe.", op,
                   ": row_map must be int64, got ", row_map.scalar_type());
  TORCH_CHECK_VALUE(row_map.device() == device, "ampipe.", op, ": row_map is on ",
                    row_map.device(), " but the data is on ", device);
}

inline void check_permute(const at::Tensor& x, const at::Tensor& row_map, int64_t num_rows) {
  TORCH_CHECK_VALUE(x.dim() == 2, "ampipe.permute: x must be a 2-D [T, H] tensor, got ",
                    x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "ampipe.permute: x must be float32/float64/float16/bfloat16, got ",
                   x.scalar_type());
  check_row_map("permute", row_map, x.device());
  TORCH_CHECK_VALUE(row_map.size(0) == x.size(0), "ampipe.permute: row_map has ",
                    row_map.size(0), " rows but x has ", x.size(0), " tokens");
  TORCH_CHECK_VALUE(num_rows >= 0, "ampipe.permute: num_rows must be >= 0, got ", num_rows);
}

inline void check_unpermute(const char* op, const at::Tensor& buffer, const at::Tensor& row_map,
                            const std::optional<at::Tensor>& gates) {
  TORCH_CHECK_VALUE(buffer.dim() == 2, "ampipe.", op,
                    ": buffer must be a 2-D [R, H] tensor, got ", buffer.sizes());
  TORCH_CHECK_TYPE(is_supported_float(buffer.scalar_type()), "ampipe.", op,
                   ": buffer must be float32/float64/float16/bfloat16, got ",
                   buffer.scalar_type());
  check_row_map(op, row_map, buffer.device());
  if (gates.has_value()) {
    const at::Tensor& g = *gates;
    TORCH_CHECK_VALUE(g.sizes() == row_map.sizes(), "ampipe.", op, ": gates has shape ",
                      g.sizes(), " but row_map has ", row_map.sizes());
    TORCH_CHECK_TYPE(g.scalar_type() == buffer.scalar_type(), "ampipe.", op, ": gates dtype ",
                     g.scalar_type(), " must match buffer dtype ", buffer.scalar_type(),
                     " (cast the gates with .to(buffer.dtype))");
    TORCH_CHECK_VALUE(g.device() == buffer.device(), "ampipe.", op, ": gates is on ",
                      g.device(), " but buffer is on ", buffer.device());
  }
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& buffer,
                           const at::Tensor& row_map) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == row_map.size(0) &&
                        grad_out.size(1) == buffer.size(1),
                    "ampipe.", op, ": grad_out must be [", row_map.size(0), ", ",
                    buffer.size(1), "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == buffer.scalar_type(), "ampipe.", op,
                   ": grad_out dtype ", grad_out.scalar_type(), " must match buffer dtype ",
                   buffer.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == buffer.device(), "ampipe.", op, ": grad_out is on ",
                    grad_out.device(), " but buffer is on ", buffer.device());
}

}  // namespace ampipe
