// Device helpers shared by the .cu files: dtype conversion, 128-bit vector loads and stores that
// widen to fp32, warp and block reductions, and the dtype dispatch. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace megamm {
namespace dev {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Rounds an fp32 value to T and back: reproduces a torch reference that materializes an
// intermediate in the input dtype.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// Elements of T in one 128-bit access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Loads N elements at p as fp32. When N is a multiple of the 128-bit width the loads are 128-bit and
// p must be 16-byte aligned (the launchers only pick such N when it is); otherwise scalar loads.
template <typename T, int N>
__device__ __forceinline__ void load(const T* p, float (&out)[N]) {
  constexpr int kPer = kVec<T>;
  if constexpr (N % kPer == 0) {
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      const Packed<T, kPer> packed = reinterpret_cast<const Packed<T, kPer>*>(p)[k];
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[k * kPer + i] = to_float<T>(packed.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float<T>(p[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  constexpr int kPer = kVec<T>;
  if constexpr (N % kPer == 0) {
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      Packed<T, kPer> packed;
#pragma unroll
      for (int i = 0; i < kPer; ++i) packed.v[i] = from_float<T>(in[k * kPer + i]);
      reinterpret_cast<Packed<T, kPer>*>(p)[k] = packed;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// scratch: __shared__ float[32]. Safe to call repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Online softmax state (running max m, sum of exp(x - m)), merged without overflow; m = -inf means
// empty.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum block_max_sum(MaxSum v, float* scratch_m, float* scratch_s) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, other);
  }
  __syncthreads();
  if (lane == 0) {
    scratch_m[warp] = v.m;
    scratch_s[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum{scratch_m[lane], scratch_s[lane]} : MaxSum{-INFINITY, 0.0f};
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, other);
  }
  return v;
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per block for a row of `vectors` 128-bit chunks: enough to cover the row up to 1024,
// a multiple of 32.
inline int row_threads(int64_t vectors, int max_threads) {
  int64_t t = (vectors + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > max_threads) t = max_threads;
  return static_cast<int>(t);
}

// Grid size for a grid-stride elementwise loop.
inline int64_t elementwise_blocks(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 65536;
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1 : blocks;
}

}  // namespace dev
}  // namespace megamm

// Runs the statement with `scalar_t` bound to the C++ type of `dtype`.
#define MEGAMM_DISPATCH_DTYPE(dtype, ...)               \
  switch (dtype) {                                      \
    case ::megamm::DType::kFloat32: {                   \
      using scalar_t = float;                           \
      __VA_ARGS__;                                      \
      break;                                            \
    }                                                   \
    case ::megamm::DType::kBFloat16: {                  \
      using scalar_t = __nv_bfloat16;                   \
      __VA_ARGS__;                                      \
      break;                                            \
    }                                                   \
    case ::megamm::DType::kFloat16: {                   \
      using scalar_t = __half;                          \
      __VA_ARGS__;                                      \
      break;                                            \
    }                                                   \
    default:                                            \
      return cudaErrorInvalidValue;                     \
  }
