// Fused fp32 CPU kernels for the decoder's non-GEMM work, registered as torch.ops.loramux_cpu.*.
//
// Each op replaces a chain of small torch ops whose per-call overhead and extra passes over
// memory dominate a decode step once the GEMMs are done (bench/RESULTS.md has the profile).
// Their semantics, as one line of torch each, and the torch references the tests compare
// against live in kernels/model_ops.py. Built on first use by that module for the
// CPU_CAPABILITY torch itself dispatches to, so at::vec and its Sleef exp match torch's own
// kernels. Threads come from ATen's pool (at::parallel_for), never a second OpenMP runtime.
//
// The kernels live in the headers of this folder, compiled as this one translation unit:
// common.h (vector type, checks), norm_rope.h, decode_attention.h, packed_linear.h,
// lora_gather.h. This file only registers them.

#include "common.h"
#include "decode_attention.h"
#include "lora_gather.h"
#include "norm_rope.h"
#include "packed_linear.h"

using namespace loramux::cpu_kernels;

// This thread's intra-op thread count, taken now in this library. ATen takes a thread's count
// lazily and once per library: at::parallel_for is inlined here with its own "taken" flag, so a
// thread's first call into these kernels applies the process-wide torch.set_num_threads count of
// that moment to the thread, whatever the thread set for itself through torch. Calling this at a
// thread's start (kernels/cpu_extension.py take_intra_op_threads) fixes its count in both.
int64_t intra_op_threads() {
  at::internal::lazy_init_num_threads();
  return at::get_num_threads();
}

TORCH_LIBRARY(loramux_cpu, m) {
  m.def("intra_op_threads() -> int", &intra_op_threads);
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
      "Tensor ranks, Tensor? weights=None) -> ()");
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

