// Scaled masked softmax over the last dim of attention scores, for the non-flash attention path.
// One block per (batch, head, query) row: an online max/sum pass over the allowed keys, then a pass
// that writes the probabilities (0 for masked keys and for rows with no allowed key).
// Backward: one block per row, dx = scale * y * (dy - <dy, y>).
#include "kernels_device.h"

namespace megamm {
namespace {

using dev::load;
using dev::store;

struct MaskSpec {
  const uint8_t* mask;  // null: no explicit mask
  int64_t mb, mh, mq, mk;
  bool causal;
  int64_t offset;  // sk - sq: query qi may see keys ki <= qi + offset when causal
};

__device__ __forceinline__ bool allowed(const MaskSpec& m, const uint8_t* row_mask, int64_t qi, int64_t ki) {
  if (m.causal && ki > qi + m.offset) return false;
  return m.mask == nullptr || row_mask[ki * m.mk] != 0;
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) softmax_forward_kernel(const T* __restrict__ x, T* __restrict__ y, MaskSpec m, int64_t heads,
                                       int64_t sq, int64_t sk, float scale) {
  __shared__ float scratch_m[32], scratch_s[32];
  const int64_t row = blockIdx.x;
  const int64_t qi = row % sq;
  const int64_t hi = (row / sq) % heads;
  const int64_t bi = row / (sq * heads);
  const uint8_t* row_mask = m.mask == nullptr ? nullptr : m.mask + bi * m.mb + hi * m.mh + qi * m.mq;
  const T* xr = x + row * sk;
  T* yr = y + row * sk;
  dev::MaxSum state{-INFINITY, 0.0f};
  for (int64_t c = threadIdx.x * V; c < sk; c += blockDim.x * V) {
    float v[V];
    load<T, V>(xr + c, v);
    float chunk_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[i] = allowed(m, row_mask, qi, c + i) ? v[i] * scale : -INFINITY;
      chunk_max = fmaxf(chunk_max, v[i]);
    }
    if (chunk_max == -INFINITY) continue;
    float chunk_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) chunk_sum += expf(v[i] - chunk_max);
    state = dev::merge(state, {chunk_max, chunk_sum});
  }
  state = dev::block_max_sum(state, scratch_m, scratch_s);
  const float inv_sum = state.s > 0.0f ? 1.0f / state.s : 0.0f;
  for (int64_t c = threadIdx.x * V; c < sk; c += blockDim.x * V) {
    float v[V], out[V];
    load<T, V>(xr + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out[i] = (state.s > 0.0f && allowed(m, row_mask, qi, c + i)) ? expf(v[i] * scale - state.m) * inv_sum : 0.0f;
    }
    store<T, V>(yr + c, out);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) softmax_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                        int64_t sk, float scale) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x * V; c < sk; c += blockDim.x * V) {
    float g[V], p[V];
    load<T, V>(dy + row * sk + c, g);
    load<T, V>(y + row * sk + c, p);
#pragma unroll
    for (int i = 0; i < V; ++i) dot += g[i] * p[i];
  }
  dot = dev::block_sum(dot, scratch);
  for (int64_t c = threadIdx.x * V; c < sk; c += blockDim.x * V) {
    float g[V], p[V], out[V];
    load<T, V>(dy + row * sk + c, g);
    load<T, V>(y + row * sk + c, p);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = scale * p[i] * (g[i] - dot);
    store<T, V>(dx + row * sk + c, out);
  }
}

}  // namespace

cudaError_t softmax_forward(const void* x, const uint8_t* mask, void* y, int64_t b, int64_t heads, int64_t sq,
                            int64_t sk, int64_t mb, int64_t mh, int64_t mq, int64_t mk, float scale, bool causal,
                            DType dtype, cudaStream_t stream) {
  const int64_t rows = b * heads * sq;
  if (rows == 0 || sk == 0) return cudaSuccess;
  const MaskSpec spec{mask, mb, mh, mq, mk, causal, sk - sq};
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* xp = static_cast<const scalar_t*>(x);
    auto* yp = static_cast<scalar_t*>(y);
    if (sk % V == 0 && dev::aligned16(x) && dev::aligned16(y)) {
      softmax_forward_kernel<scalar_t, V>
          <<<rows, dev::row_threads(sk / V, 512), 0, stream>>>(xp, yp, spec, heads, sq, sk, scale);
    } else {
      softmax_forward_kernel<scalar_t, 1>
          <<<rows, dev::row_threads(sk, 1024), 0, stream>>>(xp, yp, spec, heads, sq, sk, scale);
    }
  });
  return cudaGetLastError();
}

cudaError_t softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int64_t sk, float scale,
                             DType dtype, cudaStream_t stream) {
  if (rows == 0 || sk == 0) return cudaSuccess;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* yp = static_cast<const scalar_t*>(y);
    auto* dxp = static_cast<scalar_t*>(dx);
    if (sk % V == 0 && dev::aligned16(dy) && dev::aligned16(y) && dev::aligned16(dx)) {
      softmax_backward_kernel<scalar_t, V>
          <<<rows, dev::row_threads(sk / V, 512), 0, stream>>>(dyp, yp, dxp, sk, scale);
    } else {
      softmax_backward_kernel<scalar_t, 1>
          <<<rows, dev::row_threads(sk, 1024), 0, stream>>>(dyp, yp, dxp, sk, scale);
    }
  });
  return cudaGetLastError();
}

}  // namespace megamm
