// Cross entropy over this rank's slice of the vocabulary without an fp32 copy of the logits.
// Forward: one block per token, a single pass with an online max/sum-exp over the valid columns
// (128-bit loads), plus the target's raw logit; the caller all-reduces the three [tokens] vectors.
// Backward: one block per token writes (softmax - onehot) * grad straight in the logits' dtype,
// recomputing exp(x - max) from the logits instead of keeping a saved fp32 softmax.
#include "kernels_device.h"

namespace megamm {
namespace {

using dev::load;
using dev::store;

template <typename T, int V>
__global__ void __launch_bounds__(1024) ce_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                  float* __restrict__ row_max, float* __restrict__ sum_exp,
                                  float* __restrict__ target_logit, int64_t vocab, int64_t valid) {
  __shared__ float scratch_m[32], scratch_s[32];
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * vocab;
  dev::MaxSum state{-INFINITY, 0.0f};
  for (int64_t c = threadIdx.x * V; c < valid; c += blockDim.x * V) {
    float v[V];
    if (c + V <= valid) {
      load<T, V>(xr + c, v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = c + i < valid ? dev::to_float<T>(xr[c + i]) : -INFINITY;
    }
    float chunk_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i) chunk_max = fmaxf(chunk_max, v[i]);
    if (chunk_max == -INFINITY) continue;  // all -inf: contributes nothing (and exp(-inf + inf) is NaN)
    float chunk_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) chunk_sum += expf(v[i] - chunk_max);
    state = dev::merge(state, {chunk_max, chunk_sum});
  }
  state = dev::block_max_sum(state, scratch_m, scratch_s);
  if (threadIdx.x == 0) {
    row_max[row] = state.m;
    sum_exp[row] = state.s;
    const int64_t t = target[row];
    target_logit[row] = (t >= 0 && t < valid) ? dev::to_float<T>(xr[t]) : 0.0f;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) ce_backward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                   const float* __restrict__ row_max, const float* __restrict__ sum_exp,
                                   const float* __restrict__ grad_loss, T* __restrict__ grad, int64_t vocab,
                                   int64_t valid) {
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * vocab;
  T* gr = grad + row * vocab;
  const float m = row_max[row];
  const float g = grad_loss[row];
  const float scale = g / sum_exp[row];
  const int64_t t = target[row];
  for (int64_t c = threadIdx.x * V; c < vocab; c += blockDim.x * V) {
    float v[V], out[V];
    load<T, V>(xr + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t col = c + i;
      out[i] = col < valid ? expf(v[i] - m) * scale - (col == t ? g : 0.0f) : 0.0f;
    }
    store<T, V>(gr + c, out);
  }
}

}  // namespace

cudaError_t cross_entropy_forward(const void* logits, const int64_t* target, float* row_max, float* sum_exp,
                                  float* target_logit, int64_t rows, int64_t vocab, int64_t valid, DType dtype,
                                  cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (valid < 0 || valid > vocab) return cudaErrorInvalidValue;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* xp = static_cast<const scalar_t*>(logits);
    if (vocab % V == 0 && dev::aligned16(logits)) {
      ce_forward_kernel<scalar_t, V><<<rows, dev::row_threads(valid / V + 1, 1024), 0, stream>>>(
          xp, target, row_max, sum_exp, target_logit, vocab, valid);
    } else {
      ce_forward_kernel<scalar_t, 1><<<rows, dev::row_threads(valid, 1024), 0, stream>>>(
          xp, target, row_max, sum_exp, target_logit, vocab, valid);
    }
  });
  return cudaGetLastError();
}

cudaError_t cross_entropy_backward(const void* logits, const int64_t* target, const float* row_max,
                                   const float* sum_exp, const float* grad_loss, void* grad, int64_t rows,
                                   int64_t vocab, int64_t valid, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (valid < 0 || valid > vocab) return cudaErrorInvalidValue;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* xp = static_cast<const scalar_t*>(logits);
    auto* gp = static_cast<scalar_t*>(grad);
    if (vocab % V == 0 && dev::aligned16(logits) && dev::aligned16(grad)) {
      ce_backward_kernel<scalar_t, V><<<rows, dev::row_threads(vocab / V, 1024), 0, stream>>>(
          xp, target, row_max, sum_exp, grad_loss, gp, vocab, valid);
    } else {
      ce_backward_kernel<scalar_t, 1><<<rows, dev::row_threads(vocab, 1024), 0, stream>>>(
          xp, target, row_max, sum_exp, grad_loss, gp, vocab, valid);
    }
  });
  return cudaGetLastError();
}

}  // namespace megamm
