// The skinny GEMM of the base weights: y = x W^T + b with W packed once in column panels.
#pragma once

#include "common.h"

namespace loramux::cpu_kernels {

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

}  // namespace loramux::cpu_kernels
