// Elementwise activations of the MLP: SwiGLU on the fused [gate | up] fc1 output, and GELU (erf or
// tanh form) or quick-GELU with an optional bias added first. Grid-stride loops over chunks of V
// elements within a row (128-bit loads and stores when the row width and pointers allow it).
#include "kernels_device.h"

namespace megamm {
namespace {

using dev::load;
using dev::round_to;
using dev::store;

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

template <typename T, int V>
__global__ void swiglu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t f, int64_t work) {
  const int64_t chunks = f / V;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < work;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / chunks;
    const int64_t c = (idx % chunks) * V;
    float g[V], u[V], out[V];
    load<T, V>(x + row * 2 * f + c, g);
    load<T, V>(x + row * 2 * f + f + c, u);
    // The reference rounds silu(gate) to the input dtype before multiplying by up.
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = round_to<T>(g[i] * sigmoid(g[i])) * u[i];
    store<T, V>(y + row * f + c, out);
  }
}

template <typename T, int V>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                       int64_t f, int64_t work) {
  const int64_t chunks = f / V;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < work;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / chunks;
    const int64_t c = (idx % chunks) * V;
    float d[V], g[V], u[V], dg[V], du[V];
    load<T, V>(dy + row * f + c, d);
    load<T, V>(x + row * 2 * f + c, g);
    load<T, V>(x + row * 2 * f + f + c, u);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float s = sigmoid(g[i]);
      du[i] = d[i] * g[i] * s;
      dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
    store<T, V>(dx + row * 2 * f + c, dg);
    store<T, V>(dx + row * 2 * f + f + c, du);
  }
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoeff = 0.044715f;
constexpr float kQuickCoeff = 1.702f;

template <typename T, Activation A>
__device__ __forceinline__ float activate(float z) {
  if constexpr (A == Activation::kGeluErf) {
    return 0.5f * z * (1.0f + erff(z * kSqrtHalf));
  } else if constexpr (A == Activation::kGeluTanh) {
    return 0.5f * z * (1.0f + tanhf(kSqrt2OverPi * (z + kTanhCoeff * z * z * z)));
  } else {
    // The reference, x * sigmoid(1.702 * x), rounds 1.702 * x and the sigmoid to the input dtype.
    return z * round_to<T>(sigmoid(round_to<T>(kQuickCoeff * z)));
  }
}

template <Activation A>
__device__ __forceinline__ float activate_grad(float z) {
  if constexpr (A == Activation::kGeluErf) {
    return 0.5f * (1.0f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (z + kTanhCoeff * z * z * z));
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCoeff * z * z);
  } else {
    const float s = sigmoid(kQuickCoeff * z);
    return s + z * kQuickCoeff * s * (1.0f - s);
  }
}

// work = number of V-chunks; n % V == 0 whenever V > 1 with a bias (a chunk never straddles rows).
template <typename T, int V, Activation A, bool kBackward>
__global__ void bias_activation_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ bias,
                                       T* __restrict__ out, int64_t total, int64_t n) {
  const int64_t chunks = (total + V - 1) / V;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < chunks;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t start = idx * V;
    float z[V], d[V], res[V];
    if (start + V <= total) {
      load<T, V>(x + start, z);
      if (kBackward) load<T, V>(dy + start, d);
      if (bias != nullptr) {
        float bv[V];
        load<T, V>(bias + start % n, bv);
        // The reference adds the bias in the input dtype before the activation.
#pragma unroll
        for (int i = 0; i < V; ++i) z[i] = round_to<T>(z[i] + bv[i]);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) res[i] = kBackward ? d[i] * activate_grad<A>(z[i]) : activate<T, A>(z[i]);
      store<T, V>(out + start, res);
    } else {
      for (int64_t e = start; e < total; ++e) {  // scalar tail of the flat array
        float ze = dev::to_float<T>(x[e]);
        if (bias != nullptr) ze = round_to<T>(ze + dev::to_float<T>(bias[e % n]));
        const float r = kBackward ? dev::to_float<T>(dy[e]) * activate_grad<A>(ze) : activate<T, A>(ze);
        out[e] = dev::from_float<T>(r);
      }
    }
  }
}

template <typename T, Activation A, bool kBackward>
cudaError_t launch_activation(const T* dy, const T* x, const T* bias, T* out, int64_t rows, int64_t n,
                              cudaStream_t stream) {
  constexpr int V = dev::kVec<T>;
  const int64_t total = rows * n;
  const bool vec = (bias == nullptr || n % V == 0) && dev::aligned16(x) && dev::aligned16(out) &&
                   dev::aligned16(dy) && dev::aligned16(bias);
  const int threads = 256;
  if (vec) {
    bias_activation_kernel<T, V, A, kBackward>
        <<<dev::elementwise_blocks((total + V - 1) / V, threads), threads, 0, stream>>>(dy, x, bias, out, total, n);
  } else {
    bias_activation_kernel<T, 1, A, kBackward>
        <<<dev::elementwise_blocks(total, threads), threads, 0, stream>>>(dy, x, bias, out, total, n);
  }
  return cudaGetLastError();
}

template <typename T, bool kBackward>
cudaError_t launch_for(Activation act, const T* dy, const T* x, const T* bias, T* out, int64_t rows, int64_t n,
                       cudaStream_t stream) {
  switch (act) {
    case Activation::kGeluErf:
      return launch_activation<T, Activation::kGeluErf, kBackward>(dy, x, bias, out, rows, n, stream);
    case Activation::kGeluTanh:
      return launch_activation<T, Activation::kGeluTanh, kBackward>(dy, x, bias, out, rows, n, stream);
    case Activation::kQuickGelu:
      return launch_activation<T, Activation::kQuickGelu, kBackward>(dy, x, bias, out, rows, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t swiglu_forward(const void* x, void* y, int64_t rows, int64_t f, DType dtype, cudaStream_t stream) {
  if (rows * f == 0) return cudaSuccess;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* xp = static_cast<const scalar_t*>(x);
    auto* yp = static_cast<scalar_t*>(y);
    const int threads = 256;
    if (f % V == 0 && dev::aligned16(x) && dev::aligned16(y)) {
      const int64_t work = rows * (f / V);
      swiglu_forward_kernel<scalar_t, V>
          <<<dev::elementwise_blocks(work, threads), threads, 0, stream>>>(xp, yp, f, work);
    } else {
      swiglu_forward_kernel<scalar_t, 1>
          <<<dev::elementwise_blocks(rows * f, threads), threads, 0, stream>>>(xp, yp, f, rows * f);
    }
  });
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const void* dy, const void* x, void* dx, int64_t rows, int64_t f, DType dtype,
                            cudaStream_t stream) {
  if (rows * f == 0) return cudaSuccess;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    constexpr int V = dev::kVec<scalar_t>;
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* xp = static_cast<const scalar_t*>(x);
    auto* dxp = static_cast<scalar_t*>(dx);
    const int threads = 256;
    if (f % V == 0 && dev::aligned16(dy) && dev::aligned16(x) && dev::aligned16(dx)) {
      const int64_t work = rows * (f / V);
      swiglu_backward_kernel<scalar_t, V>
          <<<dev::elementwise_blocks(work, threads), threads, 0, stream>>>(dyp, xp, dxp, f, work);
    } else {
      swiglu_backward_kernel<scalar_t, 1>
          <<<dev::elementwise_blocks(rows * f, threads), threads, 0, stream>>>(dyp, xp, dxp, f, rows * f);
    }
  });
  return cudaGetLastError();
}

cudaError_t bias_activation_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t n,
                                    Activation act, DType dtype, cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    return launch_for<scalar_t, false>(act, nullptr, static_cast<const scalar_t*>(x),
                                       static_cast<const scalar_t*>(bias), static_cast<scalar_t*>(y), rows, n,
                                       stream);
  });
  return cudaSuccess;
}

cudaError_t bias_activation_backward(const void* dy, const void* x, const void* bias, void* dx, int64_t rows,
                                     int64_t n, Activation act, DType dtype, cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    return launch_for<scalar_t, true>(act, static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x),
                                      static_cast<const scalar_t*>(bias), static_cast<scalar_t*>(dx), rows, n,
                                      stream);
  });
  return cudaSuccess;
}

}  // namespace megamm
