// RMSNorm and LayerNorm, forward and backward. Forward: one block per row, the row read once for the
// statistics (block reduction of warp shuffles) and once more (from L1/L2) to normalize. Backward:
// a grid of at most 4 blocks per SM walks the rows; each block reduces its rows' input gradients
// like the forward and accumulates the weight (and bias) gradient of the columns each thread owns in
// shared memory, written out as one fp32 partial row per block for the caller to sum.
#include "kernels_device.h"

namespace megamm {
namespace {

using dev::load;
using dev::round_to;
using dev::store;

template <typename T, int V>
__global__ void __launch_bounds__(1024) rms_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                   float* __restrict__ rstd_out, int64_t hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  float sq = 0.0f;
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
    float v[V];
    load<T, V>(xr + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) sq += v[i] * v[i];
  }
  sq = dev::block_sum(sq, scratch);
  const float rstd = rsqrtf(sq / static_cast<float>(hidden) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
    float v[V], wv[V], out[V];
    load<T, V>(xr + c, v);
    load<T, V>(w + c, wv);
    // The reference rounds the normalized row to the input dtype before multiplying by the weight.
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = wv[i] * round_to<T>(v[i] * rstd);
    store<T, V>(yr + c, out);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) rms_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                    const float* __restrict__ rstd_in, T* __restrict__ dx,
                                    float* __restrict__ dw_partial, int64_t rows, int64_t hidden) {
  extern __shared__ float acc[];  // [hidden]; thread t only touches the columns it owns
  __shared__ float scratch[32];
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
#pragma unroll
    for (int i = 0; i < V; ++i) acc[c + i] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * hidden;
    const T* xr = x + row * hidden;
    const float rstd = rstd_in[row];
    // dx = rstd * (g - n * mean(g * n)) with g = dy * w and n = x * rstd.
    float dot = 0.0f;
    for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
      float g[V], v[V], wv[V];
      load<T, V>(dyr + c, g);
      load<T, V>(xr + c, v);
      load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) dot += g[i] * wv[i] * v[i] * rstd;
    }
    const float mean_gn = dev::block_sum(dot, scratch) / static_cast<float>(hidden);
    for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
      float g[V], v[V], wv[V], out[V];
      load<T, V>(dyr + c, g);
      load<T, V>(xr + c, v);
      load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float n = v[i] * rstd;
        out[i] = rstd * (g[i] * wv[i] - n * mean_gn);
        acc[c + i] += g[i] * round_to<T>(n);
      }
      store<T, V>(dx + row * hidden + c, out);
    }
  }
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
#pragma unroll
    for (int i = 0; i < V; ++i) dw_partial[blockIdx.x * hidden + c + i] = acc[c + i];
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) ln_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                  T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                  int64_t hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  const float inv_h = 1.0f / static_cast<float>(hidden);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
    float v[V];
    load<T, V>(xr + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) sum += v[i];
  }
  const float mean = dev::block_sum(sum, scratch) * inv_h;
  // Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels badly.
  float var = 0.0f;
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
    float v[V];
    load<T, V>(xr + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) var += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(dev::block_sum(var, scratch) * inv_h + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
    float v[V], wv[V], bv[V], out[V];
    load<T, V>(xr + c, v);
    load<T, V>(w + c, wv);
    load<T, V>(b + c, bv);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = (v[i] - mean) * rstd * wv[i] + bv[i];
    store<T, V>(yr + c, out);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) ln_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                   const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                   T* __restrict__ dx, float* __restrict__ dw_partial,
                                   float* __restrict__ db_partial, int64_t rows, int64_t hidden) {
  extern __shared__ float acc[];  // [2, hidden]: weight, bias; per-thread columns as in rms
  float* acc_w = acc;
  float* acc_b = acc + hidden;
  __shared__ float scratch[32];
  const float inv_h = 1.0f / static_cast<float>(hidden);
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
#pragma unroll
    for (int i = 0; i < V; ++i) acc_w[c + i] = acc_b[c + i] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * hidden;
    const T* xr = x + row * hidden;
    const float mean = mean_in[row];
    const float rstd = rstd_in[row];
    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w.
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
      float g[V], v[V], wv[V];
      load<T, V>(dyr + c, g);
      load<T, V>(xr + c, v);
      load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float gw = g[i] * wv[i];
        sum_g += gw;
        sum_gx += gw * (v[i] - mean) * rstd;
      }
    }
    const float mean_g = dev::block_sum(sum_g, scratch) * inv_h;
    const float mean_gx = dev::block_sum(sum_gx, scratch) * inv_h;
    for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
      float g[V], v[V], wv[V], out[V];
      load<T, V>(dyr + c, g);
      load<T, V>(xr + c, v);
      load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xhat = (v[i] - mean) * rstd;
        out[i] = rstd * (g[i] * wv[i] - mean_g - xhat * mean_gx);
        acc_w[c + i] += g[i] * xhat;
        acc_b[c + i] += g[i];
      }
      store<T, V>(dx + row * hidden + c, out);
    }
  }
  for (int64_t c = threadIdx.x * V; c < hidden; c += blockDim.x * V) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      dw_partial[blockIdx.x * hidden + c + i] = acc_w[c + i];
      db_partial[blockIdx.x * hidden + c + i] = acc_b[c + i];
    }
  }
}

// 128-bit path when every row starts 16-byte aligned; one element at a time otherwise.
template <typename T>
bool use_vectors(int64_t hidden, std::initializer_list<const void*> pointers) {
  if (hidden % dev::kVec<T> != 0) return false;
  for (const void* p : pointers) {
    if (!dev::aligned16(p)) return false;
  }
  return true;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

cudaError_t rms_norm_forward(const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                             int64_t hidden, float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (hidden <= 0) return cudaErrorInvalidValue;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    auto* yp = static_cast<scalar_t*>(y);
    if (use_vectors<scalar_t>(hidden, {x, weight, y})) {
      rms_forward_kernel<scalar_t, V>
          <<<rows, dev::row_threads(hidden / V, 512), 0, stream>>>(xp, wp, yp, rstd, hidden, eps);
    } else {
      rms_forward_kernel<scalar_t, 1>
          <<<rows, dev::row_threads(hidden, 1024), 0, stream>>>(xp, wp, yp, rstd, hidden, eps);
    }
  });
  return cudaGetLastError();
}

cudaError_t rms_norm_backward(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                              float* dweight_partial, int64_t rows, int64_t hidden, int64_t blocks, DType dtype,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (hidden <= 0 || blocks <= 0) return cudaErrorInvalidValue;
  const int64_t smem = norm_backward_smem_bytes(hidden, false);
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    auto* dxp = static_cast<scalar_t*>(dx);
    if (use_vectors<scalar_t>(hidden, {dy, x, weight, dx})) {
      const cudaError_t err = allow_smem(rms_backward_kernel<scalar_t, V>, smem);
      if (err != cudaSuccess) return err;
      rms_backward_kernel<scalar_t, V><<<blocks, dev::row_threads(hidden / V, 512), smem, stream>>>(
          dyp, xp, wp, rstd, dxp, dweight_partial, rows, hidden);
    } else {
      const cudaError_t err = allow_smem(rms_backward_kernel<scalar_t, 1>, smem);
      if (err != cudaSuccess) return err;
      rms_backward_kernel<scalar_t, 1><<<blocks, dev::row_threads(hidden, 1024), smem, stream>>>(
          dyp, xp, wp, rstd, dxp, dweight_partial, rows, hidden);
    }
  });
  return cudaGetLastError();
}

cudaError_t layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t hidden, float eps, DType dtype,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (hidden <= 0) return cudaErrorInvalidValue;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    const auto* bp = static_cast<const scalar_t*>(bias);
    auto* yp = static_cast<scalar_t*>(y);
    if (use_vectors<scalar_t>(hidden, {x, weight, bias, y})) {
      ln_forward_kernel<scalar_t, V>
          <<<rows, dev::row_threads(hidden / V, 512), 0, stream>>>(xp, wp, bp, yp, mean, rstd, hidden, eps);
    } else {
      ln_forward_kernel<scalar_t, 1>
          <<<rows, dev::row_threads(hidden, 1024), 0, stream>>>(xp, wp, bp, yp, mean, rstd, hidden, eps);
    }
  });
  return cudaGetLastError();
}

cudaError_t layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                const float* rstd, void* dx, float* dweight_partial, float* dbias_partial,
                                int64_t rows, int64_t hidden, int64_t blocks, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (hidden <= 0 || blocks <= 0) return cudaErrorInvalidValue;
  const int64_t smem = norm_backward_smem_bytes(hidden, true);
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    auto* dxp = static_cast<scalar_t*>(dx);
    if (use_vectors<scalar_t>(hidden, {dy, x, weight, dx})) {
      const cudaError_t err = allow_smem(ln_backward_kernel<scalar_t, V>, smem);
      if (err != cudaSuccess) return err;
      ln_backward_kernel<scalar_t, V><<<blocks, dev::row_threads(hidden / V, 512), smem, stream>>>(
          dyp, xp, wp, mean, rstd, dxp, dweight_partial, dbias_partial, rows, hidden);
    } else {
      const cudaError_t err = allow_smem(ln_backward_kernel<scalar_t, 1>, smem);
      if (err != cudaSuccess) return err;
      ln_backward_kernel<scalar_t, 1><<<blocks, dev::row_threads(hidden, 1024), smem, stream>>>(
          dyp, xp, wp, mean, rstd, dxp, dweight_partial, dbias_partial, rows, hidden);
    }
  });
  return cudaGetLastError();
}

}  // namespace megamm
