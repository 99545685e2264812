// CUDA kernels of the ampipe dispatch/combine ops.
//
// Design (memory-bound row movement, deterministic results, no host synchronisation):
// - make_row_map: per-tile expert histograms, an exclusive scan over tiles (ATen cumsum on
//   the device), then a pass that ranks each slot inside its expert in (k, t) order with
//   warp-level __match_any_sync and tile-wide running counters. Stable and deterministic.
// - permute and unpermute_backward walk the BUFFER rows through an inverse map (row -> slot),
//   so each output row is written by exactly one block: no atomics, unused rows zeroed in
//   the same pass, and the gate gradient is a per-row block reduction in a fixed order.
// - unpermute walks the TOKEN rows and sums its K slots in k order (fixed order).
// Rows are moved with the widest aligned vector (up to 16 bytes) the row size and the
// pointers allow. All offsets are int64.
//
// Index values are not read back to the host (that would synchronise): out-of-range
// entries trip a device-side assert and are never dereferenced. AMPIPE_OPS_CHECK=1 adds the
// CPU's host-side checks (same IndexError messages) at the cost of a synchronisation
// (also torch.ops.ampipe._set_sync_checks / ampipe.ops.set_sync_checks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../row_map_checks.h"

namespace ampipe {
namespace {

constexpr int kTile = 512;           // slots per block in make_row_map (16 warps)
constexpr int kMaxThreads = 256;     // threads per block in the row kernels
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
constexpr int64_t kMaxExperts = 12288;   // shared-memory counters in make_row_map (48 KiB)

bool sync_checks() { return sync_checks_enabled(); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

int64_t blocks_for(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxBlocks)); }

int threads_for(int64_t per_row) {
  const int64_t warps = (per_row + 31) / 32;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(1, warps) * 32));
}

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// ---------------------------------------------------------------------------------------
// make_row_map

// p = k*T + t walks slots in priority order; the slot's storage index is t*K + k.
__device__ __forceinline__ int64_t slot_of(int64_t p, int64_t T, int64_t K) {
  return (p % T) * K + p / T;
}

__global__ void __launch_bounds__(kTile)
    tile_counts_kernel(const int64_t* __restrict__ idx, int64_t T, int64_t K, int64_t E,
                       int* __restrict__ tile_counts) {
  extern __shared__ int counts[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  if (p < T * K) {
    const int64_t e = idx[slot_of(p, T, K)];
    CUDA_KERNEL_ASSERT_MSG(e >= 0 && e < E, "ampipe.make_row_map: expert id out of range");
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    tile_counts[static_cast<int64_t>(blockIdx.x) * E + e] = counts[e];
  }
}

// tile_offsets[b, e]: slots of expert e in tiles before b. starts[e]: first dropless row of e.
__global__ void __launch_bounds__(kTile)
    rank_kernel(const int64_t* __restrict__ idx, int64_t T, int64_t K, int64_t E,
                const int64_t* __restrict__ tile_offsets, const int64_t* __restrict__ starts,
                int64_t capacity, int64_t* __restrict__ row_map) {
  extern __shared__ int running[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) running[e] = 0;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const bool in_range = p < T * K;
  const int64_t s = in_range ? slot_of(p, T, K) : 0;
  int64_t e = in_range ? idx[s] : -1;
  if (e < 0 || e >= E) e = -1;  // out of range: asserted in tile_counts_kernel
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // Lanes of this warp with the same expert; this lane's rank among them (lane order is
  // t order, the priority order within a tile).
  const unsigned peers = __match_any_sync(0xffffffffu, static_cast<int>(e));
  const int local = __popc(peers & ((1u << lane) - 1u));
  int64_t rank = 0;
  for (int w = 0; w < kTile / 32; ++w) {
    __syncthreads();  // the previous warp's counter updates are visible
    if (warp == w && e >= 0) {
      rank = running[e] + local;
      __syncwarp(peers);
      if (local == 0) running[e] += __popc(peers);
    }
  }
  if (!in_range) return;
  int64_t row = -1;
  if (e >= 0) {
    rank += tile_offsets[static_cast<int64_t>(blockIdx.x) * E + e];
    if (capacity < 0) {
      row = starts[e] + rank;
    } else if (rank < capacity) {
      row = e * capacity + rank;
    }
  }
  row_map[s] = row;
}

std::tuple<at::Tensor, at::Tensor> make_row_map_cuda(const at::Tensor& indices_in,
                                                     int64_t num_experts,
                                                     std::optional<int64_t> capacity) {
  check_make_row_map(indices_in, num_experts, capacity);
  TORCH_CHECK_VALUE(num_experts <= kMaxExperts, "ampipe.make_row_map: num_experts=",
                    num_experts, " exceeds the CUDA kernel's limit of ", kMaxExperts);
  const c10::cuda::CUDAGuard guard(indices_in.device());
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  if (sync_checks()) check_expert_ids(indices.cpu(), num_experts);
  const int64_t T = indices.size(0), K = indices.size(1), N = T * K, E = num_experts;
  const auto long_opts = indices.options().dtype(at::kLong);
  at::Tensor row_map = at::empty({T, K}, long_opts);
  if (N == 0) return {row_map, at::zeros({E}, long_opts)};
  const int64_t tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK_VALUE(tiles <= INT32_MAX, "ampipe.make_row_map: too many slots (", N, ")");
  at::Tensor tile_counts = at::empty({tiles, E}, indices.options().dtype(at::kInt));
  const size_t smem = static_cast<size_t>(E) * sizeof(int);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  tile_counts_kernel<<<static_cast<unsigned>(tiles), kTile, smem, stream>>>(
      indices.const_data_ptr<int64_t>(), T, K, E, tile_counts.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor inclusive = at::cumsum(tile_counts, 0, at::kLong);
  const at::Tensor counts = inclusive[tiles - 1].clone();  // not a view of the scratch
  const at::Tensor tile_offsets = (inclusive - tile_counts).contiguous();  // int64
  const at::Tensor starts = (at::cumsum(counts, 0) - counts).contiguous();
  rank_kernel<<<static_cast<unsigned>(tiles), kTile, smem, stream>>>(
      indices.const_data_ptr<int64_t>(), T, K, E, tile_offsets.const_data_ptr<int64_t>(),
      starts.const_data_ptr<int64_t>(), capacity.has_value() ? *capacity : -1,
      row_map.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor tokens_per_expert = capacity.has_value() ? counts.clamp_max(*capacity) : counts;
  return {row_map, tokens_per_expert};
}

// ---------------------------------------------------------------------------------------
// Inverse map: inverse[r] = slot s with row_map[s] == r, else -1.

__global__ void inverse_kernel(const int64_t* __restrict__ row_map, int64_t n, int64_t R,
                               int64_t* __restrict__ inverse) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_map[s];
    if (r == -1) continue;
    CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < R, "ampipe: row_map entry out of range");
    if (r >= 0 && r < R) inverse[r] = s;
  }
}

at::Tensor inverse_map_cuda(const char* op, const at::Tensor& row_map, int64_t R) {
  if (sync_checks()) inverse_map(op, row_map.cpu(), R);
  at::Tensor inverse = at::full({R}, -1, row_map.options());
  const int64_t n = row_map.numel();
  // Launched even when R == 0: any entry other than -1 is then out of range and must trip
  // the assert, as the CPU raises (the kernel never writes `inverse` for such an entry).
  if (n > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks);
    inverse_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(row_map.const_data_ptr<int64_t>(), n,
                                                         R, inverse.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return inverse;
}

// ---------------------------------------------------------------------------------------
// permute: buffer[r] = x[inverse[r] / K] or zeros; a byte copy, so dtype-agnostic.

template <typename V>
__global__ void __launch_bounds__(kMaxThreads)
    permute_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ inverse, int64_t R,
                        int64_t K, int64_t T, int64_t per_row, V* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t s = inverse[r];
    V* dst = out + r * per_row;
    if (s < 0 || s / K >= T) {
      V zero;
#pragma unroll
      for (int j = 0; j < static_cast<int>(sizeof(V)); ++j) zero.val[j] = 0;
      for (int64_t i = threadIdx.x; i < per_row; i += blockDim.x) dst[i] = zero;
    } else {
      const V* src = x + (s / K) * per_row;
      for (int64_t i = threadIdx.x; i < per_row; i += blockDim.x) dst[i] = src[i];
    }
  }
}

template <int W>
void launch_permute_rows(const at::Tensor& x, const at::Tensor& inverse, int64_t R, int64_t K,
                         at::Tensor& out) {
  using V = Vec<uint8_t, W>;
  const int64_t per_row = x.size(1) * x.element_size() / W;
  permute_rows_kernel<V><<<static_cast<unsigned>(blocks_for(R)), threads_for(per_row), 0,
                           c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const V*>(x.const_data_ptr()), inverse.const_data_ptr<int64_t>(), R, K,
      x.size(0), per_row, static_cast<V*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& row_map_in, int64_t num_rows) {
  check_permute(x_in, row_map_in, num_rows);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t R = num_rows, K = row_map.size(1);
  at::Tensor out = at::empty({R, x.size(1)}, x.options());
  const at::Tensor inverse = inverse_map_cuda("permute", row_map, R);
  const int64_t row_bytes = x.size(1) * x.element_size();
  if (R == 0 || row_bytes == 0) return out;
  // Widest vector that divides the row size and both base pointers' alignment.
  int width = 16;
  while (width > 1 && (row_bytes % width != 0 || !aligned(x.const_data_ptr(), width) ||
                       !aligned(out.data_ptr(), width))) {
    width /= 2;
  }
  switch (width) {
    case 16: launch_permute_rows<16>(x, inverse, R, K, out); break;
    case 8: launch_permute_rows<8>(x, inverse, R, K, out); break;
    case 4: launch_permute_rows<4>(x, inverse, R, K, out); break;
    case 2: launch_permute_rows<2>(x, inverse, R, K, out); break;
    default: launch_permute_rows<1>(x, inverse, R, K, out); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// unpermute: out[t] = sum_k gates[t, k] * buffer[row_map[t, k]], accumulated in opmath.

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    unpermute_kernel(const scalar_t* __restrict__ buffer, const int64_t* __restrict__ row_map,
                     const scalar_t* __restrict__ gates,  // may be null
                     int64_t T, int64_t K, int64_t R, int64_t H, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t chunks = H / VEC;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_map[t * K + k];
        CUDA_KERNEL_ASSERT_MSG(r >= -1 && r < R, "ampipe.unpermute: row_map entry out of range");
        if (r < 0 || r >= R) continue;  // dropped (or out of range: asserted, never read)
        const acc_t w = gates != nullptr ? static_cast<acc_t>(gates[t * K + k]) : acc_t(1);
        const V v = reinterpret_cast<const V*>(buffer + r * H)[c];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += w * static_cast<acc_t>(v.val[j]);
      }
      V o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.val[j] = static_cast<scalar_t>(acc[j]);
      reinterpret_cast<V*>(out + t * H)[c] = o;
    }
  }
}

template <typename scalar_t>
int vec_width(int64_t H, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / sizeof(scalar_t));
  while (vec > 1) {
    bool ok = H % vec == 0;
    for (const void* p : ptrs) ok = ok && aligned(p, vec * static_cast<int>(sizeof(scalar_t)));
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

void check_rows_cuda(const char* op, const at::Tensor& row_map, int64_t R) {
  // Range and distinctness on the host in sync-check mode; the kernel asserts the range.
  if (sync_checks()) inverse_map(op, row_map.cpu(), R);
}

at::Tensor unpermute_cuda(const at::Tensor& buffer_in, const at::Tensor& row_map_in,
                          const std::optional<at::Tensor>& gates_in) {
  check_unpermute("unpermute", buffer_in, row_map_in, gates_in);
  const c10::cuda::CUDAGuard guard(buffer_in.device());
  const at::Tensor buffer = buffer_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const std::optional<at::Tensor> gates =
      gates_in.has_value() ? std::optional<at::Tensor>(gates_in->contiguous()) : std::nullopt;
  const int64_t T = row_map.size(0), K = row_map.size(1), R = buffer.size(0), H = buffer.size(1);
  check_rows_cuda("unpermute", row_map, R);
  at::Tensor out = at::empty({T, H}, buffer.options());
  if (T == 0 || H == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(),
                                  "ampipe_unpermute_cuda", [&] {
    const scalar_t* b = buffer.const_data_ptr<scalar_t>();
    const scalar_t* g = gates.has_value() ? gates->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const int vec = vec_width<scalar_t>(H, {b, o});
    const unsigned blocks = static_cast<unsigned>(blocks_for(T));
    const int threads = threads_for(H / vec);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t* rm = row_map.const_data_ptr<int64_t>();
    switch (vec) {
      case 8:
        unpermute_kernel<scalar_t, 8><<<blocks, threads, 0, stream>>>(b, rm, g, T, K, R, H, o);
        break;
      case 4:
        unpermute_kernel<scalar_t, 4><<<blocks, threads, 0, stream>>>(b, rm, g, T, K, R, H, o);
        break;
      case 2:
        unpermute_kernel<scalar_t, 2><<<blocks, threads, 0, stream>>>(b, rm, g, T, K, R, H, o);
        break;
      default:
        unpermute_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(b, rm, g, T, K, R, H, o);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// unpermute_backward: per buffer row r owned by slot s = (t, k):
//   grad_buffer[r] = gates[s] * grad_out[t];  grad_gates[s] = <grad_out[t], buffer[r]>.

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared /* >= 32 */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // `shared` may still be read from the previous row
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < warps; ++w) total += shared[w];  // fixed order: deterministic
  }
  return total;  // valid in thread 0
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    unpermute_backward_kernel(const scalar_t* __restrict__ grad_out,
                              const scalar_t* __restrict__ buffer,
                              const scalar_t* __restrict__ gates,
                              const int64_t* __restrict__ inverse, int64_t R, int64_t K, int64_t T,
                              int64_t H, scalar_t* __restrict__ grad_buffer,
                              scalar_t* __restrict__ grad_gates) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t shared[32];
  const int64_t chunks = H / VEC;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t s = inverse[r];  // the same for every thread of the block
    V* gb = reinterpret_cast<V*>(grad_buffer + r * H);
    if (s < 0 || s / K >= T) {
      V zero;
#pragma unroll
      for (int j = 0; j < VEC; ++j) zero.val[j] = scalar_t(0);
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) gb[c] = zero;
      continue;
    }
    const acc_t w = static_cast<acc_t>(gates[s]);
    const V* go = reinterpret_cast<const V*>(grad_out + (s / K) * H);
    const V* b = reinterpret_cast<const V*>(buffer + r * H);
    acc_t dot = acc_t(0);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const V gv = go[c];
      const V bv = b[c];
      V o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t g = static_cast<acc_t>(gv.val[j]);
        o.val[j] = static_cast<scalar_t>(w * g);
        dot += g * static_cast<acc_t>(bv.val[j]);
      }
      gb[c] = o;
    }
    dot = block_sum(dot, shared);
    if (threadIdx.x == 0) grad_gates[s] = static_cast<scalar_t>(dot);
  }
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out_in,
                                                           const at::Tensor& buffer_in,
                                                           const at::Tensor& row_map_in,
                                                           const at::Tensor& gates_in) {
  check_unpermute("unpermute_backward", buffer_in, row_map_in, gates_in);
  check_grad_out("unpermute_backward", grad_out_in, buffer_in, row_map_in);
  const c10::cuda::CUDAGuard guard(buffer_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor buffer = buffer_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const at::Tensor gates = gates_in.contiguous();
  const int64_t R = buffer.size(0), H = buffer.size(1), T = row_map.size(0), K = row_map.size(1);
  const at::Tensor inverse = inverse_map_cuda("unpermute_backward", row_map, R);
  at::Tensor grad_buffer = at::empty({R, H}, buffer.options());
  at::Tensor grad_gates = at::zeros(row_map.sizes(), gates.options());
  if (R == 0) return {grad_buffer, grad_gates};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(),
                                  "ampipe_unpermute_backward_cuda", [&] {
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* b = buffer.const_data_ptr<scalar_t>();
    const scalar_t* g = gates.const_data_ptr<scalar_t>();
    const int64_t* inv = inverse.const_data_ptr<int64_t>();
    scalar_t* gb = grad_buffer.data_ptr<scalar_t>();
    scalar_t* gg = grad_gates.data_ptr<scalar_t>();
    const int vec = vec_width<scalar_t>(H, {go, b, gb});
    const unsigned blocks = static_cast<unsigned>(blocks_for(R));
    // At least one warp even when H == 0, so the block reduction still writes a zero.
    const int threads = threads_for(H / vec);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (vec) {
      case 8:
        unpermute_backward_kernel<scalar_t, 8>
            <<<blocks, threads, 0, stream>>>(go, b, g, inv, R, K, T, H, gb, gg);
        break;
      case 4:
        unpermute_backward_kernel<scalar_t, 4>
            <<<blocks, threads, 0, stream>>>(go, b, g, inv, R, K, T, H, gb, gg);
        break;
      case 2:
        unpermute_backward_kernel<scalar_t, 2>
            <<<blocks, threads, 0, stream>>>(go, b, g, inv, R, K, T, H, gb, gg);
        break;
      default:
        unpermute_backward_kernel<scalar_t, 1>
            <<<blocks, threads, 0, stream>>>(go, b, g, inv, R, K, T, H, gb, gg);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_buffer, grad_gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(ampipe, CUDA, m) {
  m.impl("make_row_map", &make_row_map_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace ampipe
