// Torch glue of the fused CUDA kernels (module megamm._kernels_cuda, or the JIT-built equivalent):
// checks devices, dtypes, shapes and contiguity, allocates outputs, and calls the launchers of
// kernels.h on the current stream. The Python side (megamm/kernels/fused.py) owns the autograd
// wiring and decides when these functions may be called at all.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

megamm::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return megamm::DType::kFloat32;
    case at::kBFloat16:
      return megamm::DType::kBFloat16;
    case at::kHalf:
      return megamm::DType::kFloat16;
    default:
      TORCH_CHECK(false, "megamm kernels: unsupported dtype ", t.scalar_type(), " (fp32, bf16 or fp16 only)");
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "megamm kernels: ", name, " must be a CUDA tensor");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  check_cuda(b, name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "megamm kernels: ", name, " has dtype ", b.scalar_type(),
              ", expected ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "megamm kernels: ", name, " is on ", b.device(), ", expected ",
              a.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "megamm kernels: ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Rows of a [..., hidden] tensor viewed as [rows, hidden].
int64_t rows_of(const at::Tensor& x) { return x.numel() == 0 ? 0 : x.numel() / x.size(-1); }

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda(x, "x");
  check_same(x, weight, "weight");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: x and weight must be contiguous");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "rms_norm: weight has ", weight.numel(), " elements, hidden is ", hidden);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows_of(x)}, x.options().dtype(at::kFloat));
  check_launch(megamm::rms_norm_forward(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(),
                                        rows_of(x), hidden, static_cast<float>(eps), dtype_of(x), stream()),
               "rms_norm_forward");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_cuda(x, "x");
  check_same(x, dy, "grad_output");
  check_same(x, weight, "weight");
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "rms_norm_backward: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  const int64_t rows = rows_of(x);
  const int64_t blocks = megamm::norm_backward_blocks(rows, sm_count());
  auto dx = at::empty_like(x);
  auto partial = at::empty({blocks, hidden}, x.options().dtype(at::kFloat));
  check_launch(megamm::rms_norm_backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr<float>(),
                                         dx.data_ptr(), partial.data_ptr<float>(), rows, hidden, blocks,
                                         dtype_of(x), stream()),
               "rms_norm_backward");
  auto dweight = rows == 0 ? at::zeros_like(weight) : partial.sum(0).to(weight.scalar_type());
  return {dx, dweight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  check_cuda(x, "x");
  check_same(x, weight, "weight");
  check_same(x, bias, "bias");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && bias.is_contiguous(),
              "layer_norm: x, weight and bias must be contiguous");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden && bias.numel() == hidden, "layer_norm: weight/bias size != hidden ",
              hidden);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto mean = at::empty({rows_of(x)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows_of(x)}, x.options().dtype(at::kFloat));
  check_launch(megamm::layer_norm_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                          mean.data_ptr<float>(), rstd.data_ptr<float>(), rows_of(x), hidden,
                                          static_cast<float>(eps), dtype_of(x), stream()),
               "layer_norm_forward");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  check_cuda(x, "x");
  check_same(x, dy, "grad_output");
  check_same(x, weight, "weight");
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "layer_norm_backward: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  const int64_t rows = rows_of(x);
  const int64_t blocks = megamm::norm_backward_blocks(rows, sm_count());
  auto dx = at::empty_like(x);
  auto partial_w = at::empty({blocks, hidden}, x.options().dtype(at::kFloat));
  auto partial_b = at::empty({blocks, hidden}, x.options().dtype(at::kFloat));
  check_launch(megamm::layer_norm_backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr<float>(),
                                           rstd.data_ptr<float>(), dx.data_ptr(), partial_w.data_ptr<float>(),
                                           partial_b.data_ptr<float>(), rows, hidden, blocks, dtype_of(x),
                                           stream()),
               "layer_norm_backward");
  if (rows == 0) return {dx, at::zeros_like(weight), at::zeros_like(weight)};
  return {dx, partial_w.sum(0).to(weight.scalar_type()), partial_b.sum(0).to(weight.scalar_type())};
}

// x: [s, b, heads, d] with a contiguous last dim; cos, sin: fp32 [s, b, 1, d] (any strides on s, b).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_cuda(x, "x");
  dtype_of(x);
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rotary: x must be [s, b, heads, d] with a contiguous last dim");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.strides() == sin.strides(), "rotary: cos and sin differ in layout");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rotary: cos/sin must be fp32");
  TORCH_CHECK(cos.dim() == 4 && cos.size(0) == x.size(0) && cos.size(1) == x.size(1) && cos.size(2) == 1 &&
                  cos.size(3) == x.size(3) && cos.stride(3) == 1,
              "rotary: cos/sin must be [s, b, 1, d] matching x with a contiguous last dim");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), "rotary: cos/sin on another device");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  check_launch(megamm::rotary(x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr(), x.size(0),
                              x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                              cos.stride(1), backward, dtype_of(x), stream()),
               "rotary");
  return out;
}

at::Tensor swiglu_forward(const at::Tensor& x) {
  check_cuda(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0, "swiglu: x must be contiguous with an even last dim");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t f = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = f;
  auto y = at::empty(sizes, x.options());
  check_launch(megamm::swiglu_forward(x.data_ptr(), y.data_ptr(), rows_of(x), f, dtype_of(x), stream()),
               "swiglu_forward");
  return y;
}

at::Tensor swiglu_backward(const at::Tensor& dy, const at::Tensor& x) {
  check_cuda(x, "x");
  check_same(x, dy, "grad_output");
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "swiglu_backward: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  check_launch(megamm::swiglu_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), rows_of(x), x.size(-1) / 2,
                                       dtype_of(x), stream()),
               "swiglu_backward");
  return dx;
}

megamm::Activation activation_of(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "bias_activation: unknown activation ", kind);
  return static_cast<megamm::Activation>(kind);
}

const void* bias_ptr(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return nullptr;
  check_same(x, *bias, "bias");
  TORCH_CHECK(bias->is_contiguous() && bias->numel() == x.size(-1), "bias_activation: bias must be [n]");
  return bias->data_ptr();
}

at::Tensor bias_activation_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t kind) {
  check_cuda(x, "x");
  TORCH_CHECK(x.is_contiguous(), "bias_activation: x must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  check_launch(megamm::bias_activation_forward(x.data_ptr(), bias_ptr(x, bias), y.data_ptr(), rows_of(x),
                                               x.size(-1), activation_of(kind), dtype_of(x), stream()),
               "bias_activation_forward");
  return y;
}

at::Tensor bias_activation_backward(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                    int64_t kind) {
  check_cuda(x, "x");
  check_same(x, dy, "grad_output");
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "bias_activation_backward: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  check_launch(megamm::bias_activation_backward(dy.data_ptr(), x.data_ptr(), bias_ptr(x, bias), dx.data_ptr(),
                                                rows_of(x), x.size(-1), activation_of(kind), dtype_of(x), stream()),
               "bias_activation_backward");
  return dx;
}

// scores: contiguous [b, heads, sq, sk]; mask: bool broadcastable to it, or None.
at::Tensor softmax_forward(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale,
                           bool causal) {
  check_cuda(scores, "scores");
  TORCH_CHECK(scores.dim() == 4 && scores.is_contiguous(), "softmax: scores must be contiguous [b, heads, sq, sk]");
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t b = scores.size(0), heads = scores.size(1), sq = scores.size(2), sk = scores.size(3);
  auto y = at::empty_like(scores);
  const uint8_t* mask_ptr = nullptr;
  std::array<int64_t, 4> strides{0, 0, 0, 0};
  at::Tensor expanded;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "softmax: mask must be bool (True = attend)");
    TORCH_CHECK(mask->device() == scores.device(), "softmax: mask on another device");
    expanded = mask->expand({b, heads, sq, sk});
    for (int i = 0; i < 4; ++i) strides[i] = expanded.stride(i);
    mask_ptr = reinterpret_cast<const uint8_t*>(expanded.data_ptr<bool>());
  }
  check_launch(megamm::softmax_forward(scores.data_ptr(), mask_ptr, y.data_ptr(), b, heads, sq, sk, strides[0],
                                       strides[1], strides[2], strides[3], static_cast<float>(scale), causal,
                                       dtype_of(scores), stream()),
               "softmax_forward");
  return y;
}

at::Tensor softmax_backward(const at::Tensor& dy, const at::Tensor& y, double scale) {
  check_cuda(y, "probs");
  check_same(y, dy, "grad_output");
  TORCH_CHECK(dy.is_contiguous() && y.is_contiguous(), "softmax_backward: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(y.device());
  auto dx = at::empty_like(y);
  check_launch(megamm::softmax_backward(dy.data_ptr(), y.data_ptr(), dx.data_ptr(), rows_of(y), y.size(-1),
                                        static_cast<float>(scale), dtype_of(y), stream()),
               "softmax_backward");
  return dx;
}

// logits: contiguous [rows, vocab]; target: int64 [rows], local column or -1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits,
                                                                     const at::Tensor& target, int64_t valid) {
  check_cuda(logits, "logits");
  check_cuda(target, "target");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy: logits must be contiguous [rows, V]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == logits.size(0),
              "cross_entropy: target must be contiguous int64 [rows]");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::kFloat);
  auto row_max = at::empty({logits.size(0)}, opts);
  auto sum_exp = at::empty({logits.size(0)}, opts);
  auto target_logit = at::empty({logits.size(0)}, opts);
  check_launch(megamm::cross_entropy_forward(logits.data_ptr(), target.data_ptr<int64_t>(), row_max.data_ptr<float>(),
                                             sum_exp.data_ptr<float>(), target_logit.data_ptr<float>(),
                                             logits.size(0), logits.size(1), valid, dtype_of(logits), stream()),
               "cross_entropy_forward");
  return {row_max, sum_exp, target_logit};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_max,
                                  const at::Tensor& sum_exp, const at::Tensor& grad_loss, int64_t valid) {
  check_cuda(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy_backward: logits must be [rows, V]");
  for (const at::Tensor* t : {&row_max, &sum_exp, &grad_loss}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == logits.size(0),
                "cross_entropy_backward: row statistics must be contiguous fp32 [rows]");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty_like(logits);
  check_launch(megamm::cross_entropy_backward(logits.data_ptr(), target.data_ptr<int64_t>(),
                                              row_max.data_ptr<float>(), sum_exp.data_ptr<float>(),
                                              grad_loss.data_ptr<float>(), grad.data_ptr(), logits.size(0),
                                              logits.size(1), valid, dtype_of(logits), stream()),
               "cross_entropy_backward");
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megamm fused CUDA kernels (see megamm/kernels for the dispatcher and the references)";
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("layer_norm_forward", &layer_norm_forward);
  m.def("layer_norm_backward", &layer_norm_backward);
  m.def("rotary", &rotary);
  m.def("swiglu_forward", &swiglu_forward);
  m.def("swiglu_backward", &swiglu_backward);
  m.def("bias_activation_forward", &bias_activation_forward);
  m.def("bias_activation_backward", &bias_activation_backward);
  m.def("softmax_forward", &softmax_forward);
  m.def("softmax_backward", &softmax_backward);
  m.def("cross_entropy_forward", &cross_entropy_forward);
  m.def("cross_entropy_backward", &cross_entropy_backward);
}
