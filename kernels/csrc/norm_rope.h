// RMSNorm (with the residual add), rotary + KV-cache write, SiLU * up: one pass over memory each.
#pragma once

#include "common.h"

namespace loramux::cpu_kernels {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  at::Tensor out = at::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * stride;
      normalize_row(row, dot(row, row, n), wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

// residual += delta (in place); returns rms_norm(residual).
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_norm_args(residual, weight);
  check_fp32_cpu(delta, "delta");
  at::assert_no_internal_overlap(residual);  // rows are written by different threads
  TORCH_CHECK(delta.dim() == 2 && delta.stride(1) == 1 && delta.sizes() == residual.sizes(),
              "delta must have residual's shape with contiguous rows");
  const int64_t rows = residual.size(0), n = residual.size(1);
  const int64_t rs = residual.stride(0), ds = delta.stride(0);
  at::Tensor out = at::empty({rows, n}, residual.options());
  float* hp = residual.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* h = hp + r * rs;
      const float* d = dp + r * ds;
      Vec acc(0.f);
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t m = std::min(kLanes, n - i);
        const Vec sum = Vec::loadu(h + i, m) + Vec::loadu(d + i, m);
        sum.store(h + i, m);
        acc = at::vec::fmadd(sum, sum, acc);  // padding lanes of a partial load are zero
      }
      normalize_row(h, reduce_sum(acc), wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); sin carries rotate-half's sign (see rope.py).
void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i += kLanes) {
    const int64_t m = std::min(kLanes, half - i);
    const Vec x1 = Vec::loadu(x + i, m), x2 = Vec::loadu(x + half + i, m);
    (x1 * Vec::loadu(cos + i, m) + x2 * Vec::loadu(sin + i, m)).store(out + i, m);
    (x2 * Vec::loadu(cos + half + i, m) + x1 * Vec::loadu(sin + half + i, m)).store(out + half + i, m);
  }
}

at::Tensor rotary_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& positions, const at::Tensor& slots, at::Tensor& k_cache,
                           at::Tensor& v_cache, int64_t num_heads) {
  check_fp32_cpu(qkv, "qkv");
  check_fp32_cpu(cos, "cos");
  check_fp32_cpu(sin, "sin");
  check_kv_cache(k_cache, v_cache);
  const int64_t num_slots = k_cache.size(0), kv_heads = k_cache.size(1);
  const int64_t capacity = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * kv_heads) * dim,
              "qkv must be [tokens, (num_heads + 2 * kv_heads) * head_dim] with contiguous rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == dim &&
                  sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous [max_positions, head_dim]");
  const int64_t tokens = qkv.size(0);
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slots.is_contiguous() && positions.numel() == tokens &&
                  slots.numel() == tokens,
              "positions and slots must be contiguous int64 [tokens]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < capacity && pos[t] < cos.size(0), "position ", pos[t],
                " is outside the KV cache (capacity ", capacity, ")");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " is outside the KV cache");
  }
  at::Tensor q = at::empty({tokens, num_heads, dim}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  const int64_t row_stride = qkv.stride(0);
  at::parallel_for(0, tokens, row_grain(qkv.size(1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * row_stride;
      const float* c = cp + pos[t] * dim;
      const float* s = sp + pos[t] * dim;
      for (int64_t h = 0; h < num_heads; ++h) rotate(row + h * dim, c, s, qp + (t * num_heads + h) * dim, dim);
      const float* k_src = row + num_heads * dim;
      const float* v_src = k_src + kv_heads * dim;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t offset = ((slot[t] * kv_heads + h) * capacity + pos[t]) * dim;
        rotate(k_src + h * dim, c, s, kp + offset, dim);
        std::copy(v_src + h * dim, v_src + (h + 1) * dim, vp + offset);
      }
    }
  });
  return q;
}

// gate_up = [gate | up] along the last dim; returns silu(gate) * up as torch computes it.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_fp32_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [tokens, 2 * intermediate] with contiguous rows");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2, stride = gate_up.stride(0);
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Vec one(1.f);
  at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = src + r * stride;
      const float* up = gate + n;
      float* o = op + r * n;
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t m = std::min(kLanes, n - i);
        const Vec g = Vec::loadu(gate + i, m);
        ((g / (one + g.neg().exp())) * Vec::loadu(up + i, m)).store(o + i, m);
      }
    }
  });
  return out;
}

}  // namespace loramux::cpu_kernels
