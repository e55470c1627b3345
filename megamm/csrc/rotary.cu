// Rotary embedding in the rotate-half layout: channel i of a head pairs with channel i + d/2.
// Each thread rotates V consecutive pairs of one head (128-bit loads of x when the strides allow),
// reading the token's cos/sin rows, which all heads of the token share (served from L1/L2).
#include "kernels_device.h"

namespace megamm {
namespace {

using dev::load;
using dev::store;

template <typename T, int V, bool kBackward>
__global__ void rotary_kernel(const T* __restrict__ x, const float* __restrict__ cos_, const float* __restrict__ sin_,
                              T* __restrict__ out, int64_t b, int64_t heads, int64_t d, int64_t xs, int64_t xb,
                              int64_t xh, int64_t cs, int64_t cb, int64_t work) {
  const int64_t half = d / 2;
  const int64_t chunks = half / V;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < work;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = (idx % chunks) * V;
    int64_t rest = idx / chunks;  // (si * b + bi) * heads + hi
    const int64_t hi = rest % heads;
    rest /= heads;
    const int64_t bi = rest % b;
    const int64_t si = rest / b;
    const T* xr = x + si * xs + bi * xb + hi * xh;
    const float* cr = cos_ + si * cs + bi * cb;
    const float* sr = sin_ + si * cs + bi * cb;
    T* outr = out + rest * heads * d + hi * d;
    float x1[V], x2[V], c1[V], c2[V], s1[V], s2[V], o1[V], o2[V];
    load<T, V>(xr + i, x1);
    load<T, V>(xr + half + i, x2);
    load<float, V>(cr + i, c1);
    load<float, V>(cr + half + i, c2);
    load<float, V>(sr + i, s1);
    load<float, V>(sr + half + i, s2);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (kBackward) {
        // Transpose of the forward map: (g1, g2) -> (g1 c1 + g2 s2, g2 c2 - g1 s1).
        o1[k] = x1[k] * c1[k] + x2[k] * s2[k];
        o2[k] = x2[k] * c2[k] - x1[k] * s1[k];
      } else {
        // x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
        o1[k] = x1[k] * c1[k] - x2[k] * s1[k];
        o2[k] = x2[k] * c2[k] + x1[k] * s2[k];
      }
    }
    store<T, V>(outr + i, o1);
    store<T, V>(outr + half + i, o2);
  }
}

template <typename T, bool kBackward>
cudaError_t launch(const T* x, const float* cos_, const float* sin_, T* out, int64_t s, int64_t b, int64_t heads,
                   int64_t d, int64_t xs, int64_t xb, int64_t xh, int64_t cs, int64_t cb, cudaStream_t stream) {
  constexpr int V = dev::kVec<T>;
  const int64_t half = d / 2;
  // Vectors need every half-row of x, out, cos and sin 16-byte aligned: V | half (which also makes
  // fp32 cos/sin chunks whole 128-bit words, as V >= 4) and V | each stride.
  const bool vec = half % V == 0 && xs % V == 0 && xb % V == 0 && xh % V == 0 && cs % 4 == 0 && cb % 4 == 0 &&
                   dev::aligned16(x) && dev::aligned16(out) && dev::aligned16(cos_) && dev::aligned16(sin_);
  const int threads = 256;
  if (vec) {
    const int64_t work = s * b * heads * (half / V);
    rotary_kernel<T, V, kBackward><<<dev::elementwise_blocks(work, threads), threads, 0, stream>>>(
        x, cos_, sin_, out, b, heads, d, xs, xb, xh, cs, cb, work);
  } else {
    const int64_t work = s * b * heads * half;
    rotary_kernel<T, 1, kBackward><<<dev::elementwise_blocks(work, threads), threads, 0, stream>>>(
        x, cos_, sin_, out, b, heads, d, xs, xb, xh, cs, cb, work);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rotary(const void* x, const float* cos, const float* sin, void* out, int64_t s, int64_t b,
                   int64_t heads, int64_t d, int64_t xs, int64_t xb, int64_t xh, int64_t cs, int64_t cb,
                   bool backward, DType dtype, cudaStream_t stream) {
  if (d <= 0 || d % 2 != 0) return cudaErrorInvalidValue;
  if (s * b * heads == 0) return cudaSuccess;
  MEGAMM_DISPATCH_DTYPE(dtype, {
    const auto* xp = static_cast<const scalar_t*>(x);
    auto* op = static_cast<scalar_t*>(out);
    return backward ? launch<scalar_t, true>(xp, cos, sin, op, s, b, heads, d, xs, xb, xh, cs, cb, stream)
                    : launch<scalar_t, false>(xp, cos, sin, op, s, b, heads, d, xs, xb, xh, cs, cb, stream);
  });
  return cudaSuccess;
}

}  // namespace megamm
