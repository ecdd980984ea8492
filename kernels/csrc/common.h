// Shared by the fused CPU kernels (see model_ops.cpp): the vector type, argument checks and the
// small row helpers. Compiled as one translation unit with the other headers of this folder.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace loramux::cpu_kernels {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Rows per parallel task so that each task touches at least ~32K floats.
int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

float reduce_sum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  if (i < n) acc = at::vec::fmadd(Vec::loadu(a + i, n - i), Vec::loadu(b + i, n - i), acc);
  return reduce_sum(acc);
}

// out = x / sqrt(mean(x^2) + eps) * w, in the order of Hugging Face's LlamaRMSNorm.
void normalize_row(const float* x, float sum_sq, const float* w, float* out, int64_t n, float eps) {
  const Vec inv(1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t m = std::min(kLanes, n - i);
    ((Vec::loadu(x + i, m) * inv) * Vec::loadu(w + i, m)).store(out + i, m);
  }
}

void check_fp32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

void check_kv_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_fp32_cpu(k_cache, "k_cache");
  check_fp32_cpu(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(),
              "k_cache and v_cache must be contiguous [slots, kv_heads, capacity, head_dim]");
  TORCH_CHECK(k_cache.size(1) > 0, "the KV cache needs at least one KV head");
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  check_fp32_cpu(x, "x");
  check_fp32_cpu(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, hidden] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [hidden]");
}

}  // namespace loramux::cpu_kernels
