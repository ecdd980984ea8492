// The LoRA term of gathered tokens, each reading its own adapter slot's A and B once.
#pragma once

#include "common.h"

namespace loramux::cpu_kernels {

// ---- LoRA term of gathered tokens (the torch backend's gather path, kernels/torch_backend.py) ----
//
// Each token reads its own slot's A and B once, straight from the stacks in the "torch" layout
// (A^T [S, d_in, P*r], each B_p^T [S, r, out_p]), and adds its term to its row of y: one call per
// stack instead of an embedding_bag, a scale and a gather per projection.
//
// Semantics (torch reference: kernels/torch_backend.py lora_gather_ref), for i < len(rows), s = slots[i]:
//   y[rows[i], slice p] += weights[i] * scale[s, p] * (x[rows[i]] @ A_p[s]^T) @ B_p[s]^T
// weights is optional (None = 1.0: a single adapter per token); rows must be distinct (one pass of
// a mixture step holds each row once), as they are written by different threads without atomics.

// h[c] = sum_k x[k] * a[k * a_stride + c] for c < width (width <= 4 vectors), accumulated in registers.
template <int64_t kVecs>
void shrink_row(const float* x, const float* a, int64_t a_stride, int64_t d_in, int64_t width, float* h) {
  Vec acc[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) acc[v] = Vec(0.f);
  const int64_t last = width - (kVecs - 1) * kLanes;  // lanes of the last vector
  for (int64_t k = 0; k < d_in; ++k) {
    const Vec xv(x[k]);
    const float* row = a + k * a_stride;
    for (int64_t v = 0; v + 1 < kVecs; ++v) acc[v] = at::vec::fmadd(xv, Vec::loadu(row + v * kLanes), acc[v]);
    acc[kVecs - 1] = at::vec::fmadd(xv, Vec::loadu(row + (kVecs - 1) * kLanes, last), acc[kVecs - 1]);
  }
  for (int64_t v = 0; v + 1 < kVecs; ++v) acc[v].store(h + v * kLanes);
  acc[kVecs - 1].store(h + (kVecs - 1) * kLanes, last);
}

// Any width: four vectors of columns per pass over A (A's rows stay in cache between passes).
void shrink_row_any(const float* x, const float* a, int64_t d_in, int64_t width, float* h) {
  for (int64_t c0 = 0; c0 < width; c0 += 4 * kLanes) {
    const int64_t w = std::min(4 * kLanes, width - c0);
    switch ((w + kLanes - 1) / kLanes) {
      case 1: shrink_row<1>(x, a + c0, width, d_in, w, h + c0); break;
      case 2: shrink_row<2>(x, a + c0, width, d_in, w, h + c0); break;
      case 3: shrink_row<3>(x, a + c0, width, d_in, w, h + c0); break;
      default: shrink_row<4>(x, a + c0, width, d_in, w, h + c0); break;
    }
  }
}

// y[c] += sum_{j < rank} coef[j] * b[j * out + c], four vectors of y held in registers at a time.
void expand_row(const float* coef, int64_t rank, const float* b, int64_t out, float* y) {
  for (int64_t c0 = 0; c0 < out; c0 += 4 * kLanes) {
    const int64_t w = std::min(4 * kLanes, out - c0);
    const int64_t vecs = (w + kLanes - 1) / kLanes;
    Vec acc[4];
    for (int64_t v = 0; v < vecs; ++v) acc[v] = Vec::loadu(y + c0 + v * kLanes, std::min(kLanes, w - v * kLanes));
    for (int64_t j = 0; j < rank; ++j) {
      const Vec cv(coef[j]);
      const float* row = b + j * out + c0;
      for (int64_t v = 0; v < vecs; ++v)
        acc[v] = at::vec::fmadd(cv, Vec::loadu(row + v * kLanes, std::min(kLanes, w - v * kLanes)), acc[v]);
    }
    for (int64_t v = 0; v < vecs; ++v) acc[v].store(y + c0 + v * kLanes, std::min(kLanes, w - v * kLanes));
  }
}

void lora_gather(const at::Tensor& x, at::Tensor& y, const at::Tensor& rows, const at::Tensor& slots,
                 const at::Tensor& a_t, at::TensorList b_t, const at::Tensor& scale, const at::Tensor& ranks,
                 const std::optional<at::Tensor>& weights) {
  check_fp32_cpu(x, "x");
  check_fp32_cpu(y, "y");
  check_fp32_cpu(a_t, "a_t");
  check_fp32_cpu(scale, "scale");
  at::assert_no_internal_overlap(y);  // rows are written by different threads (rows[] must be distinct)
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && y.dim() == 2 && y.stride(1) == 1 && x.size(0) == y.size(0),
              "x and y must be [tokens, features] with contiguous rows");
  TORCH_CHECK(a_t.dim() == 3 && a_t.is_contiguous() && a_t.size(1) == x.size(1),
              "a_t must be a contiguous [slots, in_features, P * r] stack");
  const int64_t num_slots = a_t.size(0), d_in = a_t.size(1), width = a_t.size(2);
  const int64_t p_count = static_cast<int64_t>(b_t.size());
  TORCH_CHECK(p_count >= 1 && width % p_count == 0, "a_t's last dim must be P * r for the P given B stacks");
  const int64_t r = width / p_count;
  std::vector<const float*> b_ptr;
  std::vector<int64_t> out_of;
  int64_t total = 0;
  for (const at::Tensor& b : b_t) {
    check_fp32_cpu(b, "b_t");
    TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.size(0) == num_slots && b.size(1) == r,
                "each b_t must be a contiguous [slots, r, out_p] stack");
    b_ptr.push_back(b.data_ptr<float>());
    out_of.push_back(b.size(2));
    total += b.size(2);
  }
  TORCH_CHECK(y.size(1) == total, "y's width must be the sum of the B stacks' out_p");
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == num_slots && scale.size(1) == p_count,
              "scale must be [slots, P]");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.is_contiguous() && ranks.numel() == num_slots,
              "ranks must be int32 [slots]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.is_contiguous() &&
                  slots.is_contiguous() && rows.numel() == slots.numel(),
              "rows and slots must be contiguous int64 of one length");
  const int64_t n = rows.numel(), tokens = x.size(0);
  const float* wp = nullptr;
  if (weights.has_value()) {
    check_fp32_cpu(*weights, "weights");
    TORCH_CHECK(weights->is_contiguous() && weights->dim() == 1 && weights->numel() == n,
                "weights must be a contiguous float32 [len(rows)] (one per gathered row)");
    wp = weights->data_ptr<float>();
  }
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int32_t* rank = ranks.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(row[i] >= 0 && row[i] < tokens, "row ", row[i], " is outside x");
    TORCH_CHECK(slot[i] >= 0 && slot[i] < num_slots, "slot ", slot[i], " is outside the stack");
    TORCH_CHECK(rank[slot[i]] >= 0 && rank[slot[i]] <= r, "slot ", slot[i], " has rank ", rank[slot[i]], " > ", r);
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* ap = a_t.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(width), coef(r);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slot[i], rk = rank[s];
      if (rk == 0) continue;
      const float* xr = xp + row[i] * x_stride;
      const float* a = ap + s * d_in * width;
      shrink_row_any(xr, a, d_in, width, h.data());
      float* yr = yp + row[i] * y_stride;
      const float w = wp ? wp[i] : 1.f;
      for (int64_t p = 0, offset = 0; p < p_count; offset += out_of[p], ++p) {
        const float sc = w * sp[s * p_count + p];
        if (sc == 0.f) continue;  // a projection this adapter does not target
        for (int64_t j = 0; j < rk; ++j) coef[j] = sc * h[p * r + j];
        expand_row(coef.data(), rk, b_ptr[p] + s * r * out_of[p], out_of[p], yr + offset);
      }
    }
  });
}

}  // namespace loramux::cpu_kernels
