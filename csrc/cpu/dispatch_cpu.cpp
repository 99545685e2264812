// CPU kernels of the ampipe dispatch/combine ops.
//
// All index values are validated in a serial pre-pass (O(T*K), negligible next to the row
// traffic) before any row is read or written; the row loops then run under at::parallel_for
// with whole-row memcpy (permute) or a contiguous multiply-add per row (unpermute), so every
// thread streams through contiguous memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../row_map_checks.h"

namespace ampipe {
namespace {

// Rows per parallel task: about GRAIN_SIZE elements of work each.
int64_t row_grain(int64_t elems_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elems_per_row, 1));
}

std::tuple<at::Tensor, at::Tensor> make_row_map_cpu(const at::Tensor& indices_in,
                                                    int64_t num_experts,
                                                    std::optional<int64_t> capacity) {
  check_make_row_map(indices_in, num_experts, capacity);
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t T = indices.size(0), K = indices.size(1);
  check_expert_ids(indices, num_experts);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  at::Tensor row_map = at::empty({T, K}, indices.options());
  at::Tensor counts_t = at::zeros({num_experts}, indices.options());
  int64_t* rm = row_map.data_ptr<int64_t>();
  int64_t* counts = counts_t.data_ptr<int64_t>();
  // Rank of each slot inside its expert, walking slots in (k, t) priority order.
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = t * K + k;
      rm[s] = counts[idx[s]]++;
    }
  }
  std::vector<int64_t> starts(static_cast<size_t>(num_experts));
  int64_t running = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    starts[e] = running;
    running += counts[e];
  }
  const bool dropless = !capacity.has_value();
  const int64_t C = dropless ? 0 : *capacity;
  at::parallel_for(0, T * K, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t e = idx[s], rank = rm[s];
      rm[s] = dropless ? starts[e] + rank : (rank < C ? e * C + rank : -1);
    }
  });
  if (!dropless) counts_t.clamp_max_(C);
  return {row_map, counts_t};
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& row_map_in, int64_t num_rows) {
  check_permute(x_in, row_map_in, num_rows);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t H = x.size(1), K = row_map.size(1);
  const std::vector<int64_t> inverse = inverse_map("permute", row_map, num_rows);
  at::Tensor out = at::empty({num_rows, H}, x.options());
  if (num_rows == 0 || H == 0) return out;
  const size_t row_bytes = static_cast<size_t>(H) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, num_rows, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = inverse[r];
      char* d = dst + static_cast<size_t>(r) * row_bytes;
      if (s < 0) {
        std::memset(d, 0, row_bytes);
      } else {
        std::memcpy(d, src + static_cast<size_t>(s / K) * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& buffer_in, const at::Tensor& row_map_in,
                         const std::optional<at::Tensor>& gates_in) {
  check_unpermute("unpermute", buffer_in, row_map_in, gates_in);
  const at::Tensor buffer = buffer_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const std::optional<at::Tensor> gates =
      gates_in.has_value() ? std::optional<at::Tensor>(gates_in->contiguous()) : std::nullopt;
  const int64_t T = row_map.size(0), K = row_map.size(1), H = buffer.size(1);
  inverse_map("unpermute", row_map, buffer.size(0));  // validation only
  at::Tensor out = at::empty({T, H}, buffer.options());
  if (T == 0 || H == 0) return out;
  const int64_t* rm = row_map.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(),
                                  "ampipe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* buf = buffer.const_data_ptr<scalar_t>();
    const scalar_t* g = gates.has_value() ? gates->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(static_cast<size_t>(H));
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = rm[t * K + k];
          if (r < 0) continue;
          const acc_t w = g ? static_cast<acc_t>(g[t * K + k]) : acc_t(1);
          const scalar_t* row = buf + r * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += w * static_cast<acc_t>(row[h]);
        }
        scalar_t* orow = o + t * H;
        for (int64_t h = 0; h < H; ++h) orow[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

// grad_buffer[r] = gates[s] * grad_out[t] and grad_gates[s] = <grad_out[t], buffer[r]> for the
// slot s = (t, k) that owns row r; rows no slot owns get zero, dropped slots a zero gate grad.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out_in,
                                                          const at::Tensor& buffer_in,
                                                          const at::Tensor& row_map_in,
                                                          const at::Tensor& gates_in) {
  check_unpermute("unpermute_backward", buffer_in, row_map_in, gates_in);
  check_grad_out("unpermute_backward", grad_out_in, buffer_in, row_map_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor buffer = buffer_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const at::Tensor gates = gates_in.contiguous();
  const int64_t R = buffer.size(0), H = buffer.size(1), K = row_map.size(1);
  const std::vector<int64_t> inverse = inverse_map("unpermute_backward", row_map, R);
  at::Tensor grad_buffer = at::empty({R, H}, buffer.options());
  at::Tensor grad_gates = at::zeros(row_map.sizes(), gates.options());
  if (R == 0) return {grad_buffer, grad_gates};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(),
                                  "ampipe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* buf = buffer.const_data_ptr<scalar_t>();
    const scalar_t* g = gates.const_data_ptr<scalar_t>();
    scalar_t* gb = grad_buffer.data_ptr<scalar_t>();
    scalar_t* gg = grad_gates.data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(2 * H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t s = inverse[r];
        scalar_t* gbrow = gb + r * H;
        if (s < 0) {
          std::fill(gbrow, gbrow + H, scalar_t(0));
          continue;
        }
        const scalar_t* gorow = go + (s / K) * H;
        const scalar_t* brow = buf + r * H;
        const acc_t w = static_cast<acc_t>(g[s]);
        acc_t dot = 0;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t gov = static_cast<acc_t>(gorow[h]);
          gbrow[h] = static_cast<scalar_t>(w * gov);
          dot += gov * static_cast<acc_t>(brow[h]);
        }
        gg[s] = static_cast<scalar_t>(dot);
      }
    });
  });
  return {grad_buffer, grad_gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(ampipe, CPU, m) {
  m.impl("make_row_map", &make_row_map_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace ampipe
