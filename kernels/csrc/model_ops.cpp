// Fused fp32 CPU kernels for the decoder's non-GEMM work, registered as torch.ops.loramux_cpu.*.
//
// Each op replaces a chain of small torch ops whose per-call overhead and extra passes over
// memory dominate a decode step once the GEMMs are done (bench/RESULTS.md has the profile).
// Their semantics, as one line of torch each, and the torch references the tests compare
// against live in kernels/model_ops.py. Built on first use by that module for the
// CPU_CAPABILITY torch itself dispatches to, so at::vec and its Sleef exp match torch's own
// kernels. Threads come from ATen's pool (at::parallel_for), never a second OpenMP runtime.

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

namespace {

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


// ---- skinny GEMM for decode: y = x W^T + b with W packed in column panels ------------------------
//
// W [N, K] is packed once into [ceil(N / P), K, P] (P = one vector of columns, zero-padded), so
// each thread streams its panels front to back. The microkernel keeps a block of rows x kPanels
// panels of y in registers and prefetches the panels it will read next: at decode sizes the
// product is bound by streaming the weight from memory, which this overlaps with the arithmetic.

constexpr int64_t kPanels = 3;  // panels (column vectors) per microkernel tile
constexpr int64_t kMaxRows = kLanes == 16 ? 8 : 4;  // rows per tile (accumulators: rows * kPanels)

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  check_fp32_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be [out_features, in_features]");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kLanes - 1) / kLanes;
  at::Tensor packed = at::empty({panels, k, kLanes}, weight.options());
  const at::Tensor w = weight.contiguous();
  const float* wp = w.data_ptr<float>();
  float* pp = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t c = 0; c < kLanes; ++c) {
          const int64_t col = p * kLanes + c;
          pp[(p * k + kk) * kLanes + c] = col < n ? wp[col * k + kk] : 0.f;
        }
  });
  return packed;
}

// y[rows, kTilePanels * P] = x[rows, K] @ the tile's panels; `prefetch`: the panels read next (or null).
// Written with raw AVX-512 intrinsics where available: GCC keeps an array of __m512 accumulators
// in registers, but spills an array of at::vec::Vectorized to the stack.
template <int64_t kRows, int64_t kTilePanels>
void linear_tile(const float* x, int64_t x_stride, const float* panel, int64_t k, const float* bias, float* y,
                 int64_t y_stride, const float* prefetch) {
  const int64_t panel_stride = k * kLanes;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 acc[kRows][kTilePanels];
#pragma GCC unroll 16
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int64_t p = 0; p < kTilePanels; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 w[kTilePanels];
#pragma GCC unroll 4
    for (int64_t p = 0; p < kTilePanels; ++p) w[p] = _mm512_loadu_ps(panel + p * panel_stride + kk * kLanes);
    if (prefetch != nullptr) {
#pragma GCC unroll 4
      for (int64_t p = 0; p < kTilePanels; ++p)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + p * panel_stride + kk * kLanes), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * x_stride + kk]);
#pragma GCC unroll 4
      for (int64_t p = 0; p < kTilePanels; ++p) acc[r][p] = _mm512_fmadd_ps(xv, w[p], acc[r][p]);
    }
  }
  __m512 b[kTilePanels];
#pragma GCC unroll 4
  for (int64_t p = 0; p < kTilePanels; ++p) b[p] = bias ? _mm512_loadu_ps(bias + p * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int64_t p = 0; p < kTilePanels; ++p)
      _mm512_storeu_ps(y + r * y_stride + p * kLanes, _mm512_add_ps(acc[r][p], b[p]));
#else
  Vec acc[kRows][kTilePanels];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t p = 0; p < kTilePanels; ++p) acc[r][p] = Vec(0.f);
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec w[kTilePanels];
    for (int64_t p = 0; p < kTilePanels; ++p) w[p] = Vec::loadu(panel + p * panel_stride + kk * kLanes);
    if (prefetch != nullptr && (kk * kLanes) % 16 == 0) {
      for (int64_t p = 0; p < kTilePanels; ++p) __builtin_prefetch(prefetch + p * panel_stride + kk * kLanes);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec xv(x[r * x_stride + kk]);
      for (int64_t p = 0; p < kTilePanels; ++p) acc[r][p] = at::vec::fmadd(xv, w[p], acc[r][p]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t p = 0; p < kTilePanels; ++p)
      (bias ? acc[r][p] + Vec::loadu(bias + p * kLanes) : acc[r][p]).store(y + r * y_stride + p * kLanes);
#endif
}

// All rows of x against one tile of kTilePanels panels: blocks of kMaxRows rows, then the rest.
template <int64_t kTilePanels>
void linear_rows(const float* x, int64_t x_stride, int64_t rows, const float* panel, int64_t k, const float* bias,
                 float* y, int64_t y_stride, const float* prefetch) {
  int64_t r = 0;
  for (; r + kMaxRows <= rows; r += kMaxRows) {
    // Only the first row block streams the panels from memory: prefetch the next ones then.
    linear_tile<kMaxRows, kTilePanels>(x + r * x_stride, x_stride, panel, k, bias, y + r * y_stride, y_stride,
                                      r == 0 ? prefetch : nullptr);
  }
  const float* pf = r == 0 ? prefetch : nullptr;
  x += r * x_stride;
  y += r * y_stride;
  switch (rows - r) {
    case 0: break;
    case 1: linear_tile<1, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    case 2: linear_tile<2, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    case 3: linear_tile<3, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    case 4: linear_tile<4, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    case 5: linear_tile<5, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    case 6: linear_tile<6, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    case 7: linear_tile<7, kTilePanels>(x, x_stride, panel, k, bias, y, y_stride, pf); break;
    default: TORCH_CHECK(false, "more rows left than a row block");
  }
}

void linear_rows_of(int64_t panels, const float* x, int64_t x_stride, int64_t rows, const float* panel, int64_t k,
                    const float* bias, float* y, int64_t y_stride, const float* prefetch) {
  switch (panels) {
    case 1: linear_rows<1>(x, x_stride, rows, panel, k, bias, y, y_stride, prefetch); break;
    case 2: linear_rows<2>(x, x_stride, rows, panel, k, bias, y, y_stride, prefetch); break;
    case 3: linear_rows<3>(x, x_stride, rows, panel, k, bias, y, y_stride, prefetch); break;
    default: TORCH_CHECK(false, "a tile has 1 to 3 panels");
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  check_fp32_cpu(x, "x");
  check_fp32_cpu(packed, "packed");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kLanes,
              "packed must come from pack_linear_weight on this machine");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == packed.size(1),
              "x must be [rows, in_features] with contiguous rows");
  const int64_t rows = x.size(0), k = x.size(1), panels = packed.size(0), n = out_features;
  TORCH_CHECK(n <= panels * kLanes && n > (panels - 1) * kLanes, "out_features does not match the packed weight");
  if (bias.has_value()) {
    check_fp32_cpu(*bias, "bias");
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == n, "bias must be [out_features]");
  }
  at::Tensor y = at::empty({rows, n}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t x_stride = x.stride(0), panel_stride = k * kLanes;
  const int64_t tiles = (panels + kPanels - 1) / kPanels;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kPanels, count = std::min(kPanels, panels - p0);
      const int64_t col = p0 * kLanes, width = std::min(count * kLanes, n - col);
      const float* next = t + 1 < end ? pp + (p0 + kPanels) * panel_stride : nullptr;
      const float* panel = pp + p0 * panel_stride;
      if (width == count * kLanes) {  // whole panels: straight into y
        linear_rows_of(count, xp, x_stride, rows, panel, k, bp ? bp + col : nullptr, yp + col, n, next);
        continue;
      }
      // The last, partial panel: through a scratch as wide as the tile, then its valid columns.
      std::vector<float> scratch(rows * count * kLanes);
      linear_rows_of(count, xp, x_stride, rows, panel, k, nullptr, scratch.data(), count * kLanes, nullptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < width; ++c) yp[r * n + col + c] = scratch[r * count * kLanes + c] + (bp ? bp[col + c] : 0.f);
    }
  });
  return y;
}


// ---- LoRA term of gathered tokens (the torch backend's gather path, kernels/torch_backend.py) ----
//
// Each token reads its own slot's A and B once, straight from the stacks in the "torch" layout
// (A^T [S, d_in, P*r], each B_p^T [S, r, out_p]), and adds its term to its row of y: one call per
// stack instead of an embedding_bag, a scale and a gather per projection.

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
                 const at::Tensor& a_t, at::TensorList b_t, const at::Tensor& scale, const at::Tensor& ranks) {
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
      for (int64_t p = 0, offset = 0; p < p_count; offset += out_of[p], ++p) {
        const float sc = sp[s * p_count + p];
        if (sc == 0.f) continue;  // a projection this adapter does not target
        for (int64_t j = 0; j < rk; ++j) coef[j] = sc * h[p * r + j];
        expand_row(coef.data(), rk, b_ptr[p] + s * r * out_of[p], out_of[p], yr + offset);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loramux_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def(
      "rotary_kv_write(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor slots, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, int num_heads) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, float scale) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def(
      "lora_gather(Tensor x, Tensor(a!) y, Tensor rows, Tensor slots, Tensor a_t, Tensor[] b_t, Tensor scale, "
      "Tensor ranks) -> ()");
}

TORCH_LIBRARY_IMPL(loramux_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_kv_write", &rotary_kv_write);
  m.impl("decode_attention", &decode_attention);
  m.impl("silu_mul", &silu_mul);
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
  m.impl("lora_gather", &lora_gather);
}
