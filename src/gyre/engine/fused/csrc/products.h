// Products over all T*B rows on the tiled kernel, as ops of every module (its first translation
// unit registers them with def_products): mm_rows(a, mat, bias) = a @ mat (+ bias) (the input
// projection with mat the transposed weight, and its input gradient) and mm_tn(a, b, sum_b) =
// [a^T @ b] (its weight gradient), with b.sum(0) after it when sum_b (the bias's); float32 and
// float64 on CPU. Their outputs come from the buffer pool (runtime.h: pooled): a product over
// all rows of a long sequence is hundreds of MiB, which torch's allocator maps fresh (page
// faults on every 4 KiB) on every call.
#pragma once
#include "runtime.h"
namespace {
template <typename T>
void mm_rows_t(const at::Tensor& a, const at::Tensor& mat, const at::Tensor* bias, at::Tensor& out) {
  Packed pk = pack<T>(mat);
  mm_rows<T>(a.data_ptr<T>(), a.stride(0), a.size(0), pk, out.data_ptr<T>(), out.size(1),
             bias == nullptr ? nullptr : bias->data_ptr<T>());
}

at::Tensor mm_rows_op(const at::Tensor& a_, const at::Tensor& mat,
                      const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(a_.dim() == 2 && mat.dim() == 2 && a_.size(1) == mat.size(0),
              "gyre mm_rows: a (M x K) and mat (K x N) expected");
  TORCH_CHECK(a_.scalar_type() == mat.scalar_type() && a_.device().is_cpu() && mat.device().is_cpu()
              && (a_.scalar_type() == at::kFloat || a_.scalar_type() == at::kDouble),
              "gyre mm_rows: float32 or float64 CPU tensors of one dtype expected");
  const int64_t M = a_.size(0), K = a_.size(1), N = mat.size(1);
  const at::Tensor a = a_.stride(1) == 1 && a_.stride(0) >= K ? a_ : a_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->numel() == N && bias_->scalar_type() == a.scalar_type(),
                "gyre mm_rows: bias of mat's N elements expected");
    bias = bias_->contiguous();
  }
  at::Tensor out = pooled({M, N}, a.options(), false);
  FlushSubnormals flush;
  const at::Tensor* b = bias.defined() ? &bias : nullptr;
  if (a.scalar_type() == at::kDouble) mm_rows_t<double>(a, mat, b, out);
  else mm_rows_t<float>(a, mat, b, out);
  return out;
}

std::vector<at::Tensor> mm_tn_op(const at::Tensor& a_, const at::Tensor& b_, bool sum_b) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.size(0) == b_.size(0),
              "gyre mm_tn: a (K x M) and b (K x N) expected");
  TORCH_CHECK(a_.scalar_type() == b_.scalar_type() && a_.device().is_cpu() && b_.device().is_cpu()
              && (a_.scalar_type() == at::kFloat || a_.scalar_type() == at::kDouble),
              "gyre mm_tn: float32 or float64 CPU tensors of one dtype expected");
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  at::Tensor out = pooled({M, N}, a.options(), false);
  std::vector<at::Tensor> res{out};
  if (sum_b) res.push_back(at::zeros({N}, a.options()));
  FlushSubnormals flush;
  if (a.scalar_type() == at::kDouble)
    matmul_tn<double>(a.data_ptr<double>(), b.data_ptr<double>(), out.data_ptr<double>(), K, M, N,
                      false, sum_b ? res[1].data_ptr<double>() : nullptr);
  else
    matmul_tn<float>(a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), K, M, N,
                     false, sum_b ? res[1].data_ptr<float>() : nullptr);
  return res;
}

void def_products(torch::Library& m) {
  m.def("mm_rows(Tensor a, Tensor mat, Tensor? bias) -> Tensor", &mm_rows_op);
  m.def("mm_tn(Tensor a, Tensor b, bool sum_b) -> Tensor[]", &mm_tn_op);
}
}  // namespace
