// Launchers of megamm's fused CUDA kernels: raw device pointers, sizes and a stream, nothing from
// torch, so the .cu files compile with nvcc alone and the torch glue (kernels_torch.cpp) stays in C++.
//
// Conventions: tensors are contiguous unless strides are passed; element counts are int64; every
// launcher returns the launch's cudaError_t (cudaErrorInvalidValue for arguments it cannot handle)
// and the caller turns a failure into an exception. Floating-point inputs are fp32, bf16 or fp16
// (`DType`); all arithmetic is in fp32 and results are rounded once to the output type, except where
// a comment says that the torch reference rounds an intermediate and the kernel does the same.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace megamm {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Blocks of the norm backward kernels (each walks rows blockIdx.x, + gridDim.x, ...): up to 4 per SM,
// enough for full occupancy at 512 threads where shared memory allows. Each block writes one row of
// fp32 partial weight (and bias) gradients, [blocks, hidden], which the caller sums over blocks.
inline int64_t norm_backward_blocks(int64_t rows, int sm_count) {
  const int64_t wanted = 4 * static_cast<int64_t>(sm_count);
  return rows < wanted ? rows : wanted;
}

// Bytes of dynamic shared memory the norm backward kernels need per block (one fp32 accumulator per
// column for the weight, and one more for the bias when layernorm).
inline int64_t norm_backward_smem_bytes(int64_t hidden, bool layernorm) {
  return hidden * static_cast<int64_t>(sizeof(float)) * (layernorm ? 2 : 1);
}

// RMSNorm, x and y [rows, hidden], weight [hidden] (same dtype as x): y = w * round(x * rstd),
// rstd [rows] (fp32) saved for the backward.
cudaError_t rms_norm_forward(const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                             int64_t hidden, float eps, DType dtype, cudaStream_t stream);

// dx [rows, hidden]; dweight_partial [blocks, hidden] fp32 with blocks = norm_backward_blocks().
cudaError_t rms_norm_backward(const void* dy, const void* x, const void* weight, const float* rstd,
                              void* dx, float* dweight_partial, int64_t rows, int64_t hidden,
                              int64_t blocks, DType dtype, cudaStream_t stream);

// LayerNorm: y = (x - mean) * rstd * w + b, mean and rstd [rows] fp32 saved for the backward.
cudaError_t layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t hidden, float eps, DType dtype,
                               cudaStream_t stream);

// dweight_partial and dbias_partial: [blocks, hidden] fp32 each.
cudaError_t layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                const float* rstd, void* dx, float* dweight_partial, float* dbias_partial,
                                int64_t rows, int64_t hidden, int64_t blocks, DType dtype,
                                cudaStream_t stream);

// Rotary embedding, rotate-half layout. x: [s, b, heads, d] with element strides (xs, xb, xh) and a
// contiguous last dim; cos, sin: fp32 [s, b, d] with strides (cs, cb) and a contiguous last dim (one
// row per token, so position offsets and packed restarts are whatever the caller gathered); out:
// contiguous [s, b, heads, d]. backward=true applies the transpose (the gradient of the rotation).
cudaError_t rotary(const void* x, const float* cos, const float* sin, void* out, int64_t s, int64_t b,
                   int64_t heads, int64_t d, int64_t xs, int64_t xb, int64_t xh, int64_t cs, int64_t cb,
                   bool backward, DType dtype, cudaStream_t stream);

// SwiGLU on the fused fc1 output: x [rows, 2f] = [gate | up], y [rows, f] = silu(gate) * up.
cudaError_t swiglu_forward(const void* x, void* y, int64_t rows, int64_t f, DType dtype, cudaStream_t stream);
// dx [rows, 2f] from dy [rows, f] and x.
cudaError_t swiglu_backward(const void* dy, const void* x, void* dx, int64_t rows, int64_t f, DType dtype,
                            cudaStream_t stream);

enum class Activation : int { kGeluErf = 0, kGeluTanh = 1, kQuickGelu = 2 };

// y = act(x + bias), x and y [rows, n], bias [n] or null.
cudaError_t bias_activation_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t n,
                                    Activation act, DType dtype, cudaStream_t stream);
// dx = dy * act'(x + bias); the bias gradient is the column sum of dx (left to the caller).
cudaError_t bias_activation_backward(const void* dy, const void* x, const void* bias, void* dx, int64_t rows,
                                     int64_t n, Activation act, DType dtype, cudaStream_t stream);

// Scaled masked softmax over the last dim of scores [b, heads, sq, sk] (contiguous):
// y = softmax(scale * x) over the allowed keys, 0 elsewhere and on rows with no allowed key.
// mask: bool (1 byte) or null, True = may attend, read at bi*mb + hi*mh + qi*mq + ki*mk (element
// strides, 0 for broadcast dims). causal: key ki is allowed only if ki <= qi + (sk - sq).
cudaError_t softmax_forward(const void* x, const uint8_t* mask, void* y, int64_t b, int64_t heads, int64_t sq,
                            int64_t sk, int64_t mb, int64_t mh, int64_t mq, int64_t mk, float scale,
                            bool causal, DType dtype, cudaStream_t stream);
// dx = scale * y * (dy - sum(dy * y)) per row; rows = b * heads * sq.
cudaError_t softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int64_t sk, float scale,
                             DType dtype, cudaStream_t stream);

// Cross entropy statistics of this rank's slice of the vocabulary, logits [rows, vocab] in their own
// dtype (no fp32 copy is made). Columns >= valid are padding and ignored. target [rows] int64 is the
// local column of the target or -1 (on another rank, or ignored). Outputs fp32 [rows]: the row max
// over the valid columns (-inf if none), sum(exp(x - max)) and the target's raw logit (0 if -1).
cudaError_t cross_entropy_forward(const void* logits, const int64_t* target, float* row_max, float* sum_exp,
                                  float* target_logit, int64_t rows, int64_t vocab, int64_t valid, DType dtype,
                                  cudaStream_t stream);
// grad [rows, vocab] = (exp(x - max) / sum_exp - [col == target]) * grad_loss for valid columns, 0 for
// padding; max and sum_exp are the global (all-reduced) values, grad_loss is 0 on ignored rows.
cudaError_t cross_entropy_backward(const void* logits, const int64_t* target, const float* row_max,
                                   const float* sum_exp, const float* grad_loss, void* grad, int64_t rows,
                                   int64_t vocab, int64_t valid, DType dtype, cudaStream_t stream);

}  // namespace megamm
