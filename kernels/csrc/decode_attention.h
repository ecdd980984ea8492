// Decode attention: one query per sequence against its cached keys and values (GQA by head groups).
#pragma once

#include "common.h"

namespace loramux::cpu_kernels {

// Attention of `group` query heads to the `len` cached keys/values of their KV head.
// kDim > 0 fixes the head dim at compile time (64 and 128 are common): the loops over it unroll
// and the accumulators stay in registers. scores: scratch of group * len floats.
template <int64_t kDim>
void attend(const float* queries, const float* keys, const float* values, float* outs, int64_t len,
            int64_t group, int64_t runtime_dim, float scale, float* scores) {
  const int64_t dim = kDim > 0 ? kDim : runtime_dim;
  // 1) scores[g][j] = q_g . k_j * scale; each key row is read once for the whole group.
  constexpr int64_t kLineFloats = 16;  // one 64-byte cache line
  for (int64_t j = 0; j < len; ++j) {
    const float* k = keys + j * dim;
    // The cache is read once per step, from memory: ask for the value row (used in step 3) and
    // a key row ahead now, so the loads overlap this arithmetic.
    for (int64_t d = 0; d < dim; d += kLineFloats) {
      __builtin_prefetch(values + j * dim + d);
      __builtin_prefetch(k + 8 * dim + d);
    }
    for (int64_t g = 0; g < group; ++g) scores[g * len + j] = dot(queries + g * dim, k, dim) * scale;
  }
  for (int64_t g = 0; g < group; ++g) {
    // 2) softmax weights, max-subtracted; the normalisation is folded into the output.
    float* s = scores + g * len;
    const float max = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, len);
    const Vec vmax(max);
    Vec sum(0.f);
    for (int64_t j = 0; j < len; j += kLanes) {
      const int64_t m = std::min(kLanes, len - j);
      Vec e = (Vec::loadu(s + j, m) - vmax).exp();
      if (m < kLanes) e = Vec::set(Vec(0.f), e, m);  // drop padding lanes from the sum
      e.store(s + j, m);
      sum = sum + e;
    }
    const Vec inv(1.f / reduce_sum(sum));
    // 3) out_g = sum_j p_j v_j / sum_j p_j, accumulated in registers a few vectors at a time.
    float* o = outs + g * dim;
    constexpr int64_t kChunk = 4 * kLanes;
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      const int64_t width = std::min(kChunk, dim - d0);
      Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
      if (width == kChunk) {
        for (int64_t j = 0; j < len; ++j) {
          const Vec p(s[j]);
          const float* v = values + j * dim + d0;
          for (int c = 0; c < 4; ++c) acc[c] = at::vec::fmadd(p, Vec::loadu(v + c * kLanes), acc[c]);
        }
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const Vec p(s[j]);
          const float* v = values + j * dim + d0;
          for (int64_t c = 0; c * kLanes < width; ++c) {
            const int64_t m = std::min(kLanes, width - c * kLanes);
            acc[c] = at::vec::fmadd(p, Vec::loadu(v + c * kLanes, m), acc[c]);
          }
        }
      }
      for (int64_t c = 0; c * kLanes < width; ++c) {
        (acc[c] * inv).store(o + d0 + c * kLanes, std::min(kLanes, width - c * kLanes));
      }
    }
  }
}

// One query per sequence over its cached context; the query heads of a KV head share its reads.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  check_fp32_cpu(q, "q");
  check_kv_cache(k_cache, v_cache);
  const int64_t num_slots = k_cache.size(0), kv_heads = k_cache.size(1);
  const int64_t capacity = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.size(2) == dim && q.size(1) % kv_heads == 0,
              "q must be contiguous [seqs, num_heads, head_dim] with num_heads a multiple of kv_heads");
  const int64_t seqs = q.size(0), num_heads = q.size(1), group = num_heads / kv_heads;
  TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && slots.is_contiguous() &&
                  lengths.is_contiguous() && slots.numel() == seqs && lengths.numel() == seqs,
              "slots and lengths must be contiguous int64 [seqs]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < seqs; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < num_slots, "slot ", slot[i], " is outside the KV cache");
    TORCH_CHECK(length[i] >= 1 && length[i] <= capacity, "context length ", length[i],
                " is outside [1, KV cache capacity ", capacity, "]");
  }
  at::Tensor out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  auto kernel = dim == 64 ? &attend<64> : dim == 128 ? &attend<128> : &attend<0>;
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / kv_heads, h = task % kv_heads;
      const int64_t cache_at = (slot[i] * kv_heads + h) * capacity * dim;
      const int64_t heads_at = (i * num_heads + h * group) * dim;  // the group's consecutive query heads
      scores.resize(group * length[i]);
      kernel(qp + heads_at, kp + cache_at, vp + cache_at, op + heads_at, length[i], group, dim, fscale,
             scores.data());
    }
  });
  return out;
}

}  // namespace loramux::cpu_kernels
