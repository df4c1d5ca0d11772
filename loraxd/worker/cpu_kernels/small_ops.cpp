// The small per-layer ops of a decode step, each one call instead of a handful of torch ops:
// residual add + RMSNorm, silu(gate) * up, and the rotary rotation of q and k with the K/V
// cache write that follows it. At decode sizes ([8, 576]) every torch op costs a few µs of
// dispatch and an allocation for a fraction of a µs of arithmetic; a decode step of a
// 30-layer model ran about 250 of them. fp32 and bf16 (bf16 computed in fp32, rounded where
// the torch code rounds: every torch op on bf16 rounds its result to bf16). Elementwise
// results equal the torch code's bit for bit (products are kept apart from the sums they
// feed: a fused multiply-add would round once where torch rounds twice); the norm's mean
// square is a double sum (torch: a float one), silu's e^x a polynomial within ~1 ulp of
// expf. Every row is computed alone, the same way in any batch; rows go to threads only
// when a call is big enough (a prompt) for the fork to pay.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

namespace {

using loraxd_vec::bf16_bits;
using loraxd_vec::exp_nonpositive;
using loraxd_vec::load;
using loraxd_vec::splat;
using loraxd_vec::store;
using loraxd_vec::v16;
using loraxd_vec::vi16;
typedef double v8d __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
using bf16 = c10::BFloat16;
constexpr int64_t kLanes = 16;
// elements (weighted by their cost) a thread should get before a fork pays: one thread
// does ~32k in 30-40 µs (measured), several times what an OpenMP fork and join costs on an
// idle machine; a decode step's calls (8 rows) stay on the calling thread. On a loaded one
// a fork can wait milliseconds for the other thread to get a core.
constexpr int64_t kMinElementsPerThread = 1 << 15;

// A value the compiler must materialize: no multiply-add contracts across it.
inline v16 kept(v16 x) { asm("" : "+v"(x)); return x; }
inline float kept(float x) { asm("" : "+v"(x)); return x; }

// `rounded` is what a store (vec_math.h) then a load would give.
inline v16 rounded(v16 v, const float*) { return v; }
inline float get(const float* p) { return *p; }
inline void put(float* p, float x) { *p = x; }
inline float rounded(float x, const float*) { return x; }

inline v16 rounded(v16 v, const bf16*) { return (v16)bf16_bits(v); }
inline float get(const bf16* p) { return float(*p); }
inline void put(bf16* p, float x) { *p = bf16(x); }
inline float rounded(float x, const bf16*) { return float(bf16(x)); }

template <typename F>
void for_rows(int64_t rows, int64_t elements_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread /
                                                 std::max<int64_t>(1, elements_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) f(r);
  });
}

// ---- RMSNorm ------------------------------------------------------------------------------

// out = w * norm(s) over one row of n, s = x (+ r, rounded to T and kept in `sum`).
// `W` bf16 (Llama's norm on bf16): norm(s) is rounded to bf16 before the weight multiplies
// it, as `weight * normed.to(dtype)` does; `W` fp32 (fp32 models, Gemma's fp32 (1 + w)):
// it is not.
template <typename T, typename W>
void norm_row(const T* x, const T* r, T* sum, T* out, const W* w, int64_t n, float eps) {
  const int64_t full = n / kLanes * kLanes;
  const T* s = x;
  v8d acc0{}, acc1{};
  double tail = 0;
  auto square = [&](v16 v) {
    const v8d lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), v8d);
    const v8d hi = __builtin_convertvector(
        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), v8d);
    acc0 += lo * lo;
    acc1 += hi * hi;
  };
  if (r != nullptr) {
    s = sum;
    for (int64_t c = 0; c < full; c += kLanes) {
      const v16 v = rounded(load(x + c) + load(r + c), x);
      store(sum + c, v);
      square(v);
    }
    for (int64_t c = full; c < n; ++c) {
      const float v = rounded(get(x + c) + get(r + c), x);
      put(sum + c, v);
      tail += double(v) * v;
    }
  } else {
    for (int64_t c = 0; c < full; c += kLanes) square(load(x + c));
    for (int64_t c = full; c < n; ++c) tail += double(get(x + c)) * get(x + c);
  }
  const v8d a = acc0 + acc1;
  double total = tail;
  for (int j = 0; j < 8; ++j) total += a[j];
  const float variance = n > 0 ? float(total / double(n)) : 0.f;
  const float inv = 1.f / std::sqrt(variance + eps);
  const bool round_normed = sizeof(W) == sizeof(bf16);
  for (int64_t c = 0; c < full; c += kLanes) {
    v16 normed = load(s + c) * inv;
    if (round_normed) normed = rounded(normed, s);
    store(out + c, load(w + c) * normed);
  }
  for (int64_t c = full; c < n; ++c) {
    float normed = get(s + c) * inv;
    if (round_normed) normed = rounded(normed, s);
    put(out + c, get(w + c) * normed);
  }
}

// Rows of x as [A, B, n] (a 2-D x is [A, 1, n]), the last dimension contiguous.
struct Rows {
  int64_t a, b, n, stride_a, stride_b;
  int64_t count() const { return a * b; }
  int64_t offset(int64_t row) const { return row / b * stride_a + row % b * stride_b; }
};

Rows rows_of(const at::Tensor& x, const char* what) {
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1, what,
              " must be 2-D or 3-D with a contiguous last dimension");
  if (x.dim() == 2) return {x.size(0), 1, x.size(1), x.stride(0), 0};
  return {x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1)};
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm: x must be float32 or bfloat16");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(-1) &&
              (weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type()),
              "rms_norm: weight must be contiguous [", x.size(-1), "] of float32 or x's dtype");
}

// One kernel for every case: `r`/`sum` null without a residual; `out` may be x (in place).
template <typename T, typename W>
void norm_all(const at::Tensor& x, const at::Tensor* r, at::Tensor* sum, const at::Tensor& out,
              const at::Tensor& weight, double eps) {
  const Rows in = rows_of(x, "rms_norm: x"), o = rows_of(out, "rms_norm: out");
  const Rows rr = r ? rows_of(*r, "rms_norm: residual") : in;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* rp = r ? static_cast<const T*>(r->data_ptr()) : nullptr;
  T* sp = sum ? static_cast<T*>(sum->data_ptr()) : nullptr;
  T* op = static_cast<T*>(out.data_ptr());
  const W* wp = static_cast<const W*>(weight.data_ptr());
  const int64_t n = in.n;
  for_rows(in.count(), 2 * n, [&](int64_t row) {
    norm_row<T, W>(xp + in.offset(row), rp ? rp + rr.offset(row) : nullptr,
                   sp ? sp + row * n : nullptr, op + o.offset(row), wp, n, float(eps));
  });
}

void dispatch_norm(const at::Tensor& x, const at::Tensor* r, at::Tensor* sum,
                   const at::Tensor& out, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  const bool w32 = weight.scalar_type() == at::kFloat;
  if (x.scalar_type() == at::kFloat)
    norm_all<float, float>(x, r, sum, out, weight, eps);
  else if (w32)
    norm_all<bf16, float>(x, r, sum, out, weight, eps);
  else
    norm_all<bf16, bf16>(x, r, sum, out, weight, eps);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  rows_of(x, "rms_norm: x");
  at::Tensor out = at::empty(x.sizes(), x.options());
  dispatch_norm(x, nullptr, nullptr, out, weight, eps);
  return out;
}

void rms_norm_(const at::Tensor& x, const at::Tensor& weight, double eps) {
  dispatch_norm(x, nullptr, nullptr, x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() &&
              residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: x and residual must be 2-D of one shape and dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor sum = at::empty(x.sizes(), x.options());
  dispatch_norm(x, &residual, &sum, out, weight, eps);
  return {out, sum};
}

// ---- silu(gate) * up ----------------------------------------------------------------------


// x * sigmoid(x) from e = e^-|x| (never overflows): x / (1 + e) for x >= 0, else
// x * e / (1 + e).
inline v16 silu(v16 x) {
  const v16 e = exp_nonpositive(x < 0 ? x : -x);
  const v16 num = x < 0 ? x * e : x;
  return num / (1.f + e);
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  const int64_t full = n / kLanes * kLanes;
  for (int64_t c = 0; c < full; c += kLanes)
    store(out + c, rounded(silu(load(g + c)), g) * load(u + c));
  if (full < n) {  // the tail through a padded vector: the same arithmetic as the lanes
    float gt[kLanes] = {}, ut[kLanes] = {}, ot[kLanes];
    for (int64_t c = full; c < n; ++c) { gt[c - full] = get(g + c); ut[c - full] = get(u + c); }
    const v16 o = rounded(silu(load(gt)), g) * load(ut);
    std::memcpy(ot, &o, sizeof o);
    for (int64_t c = full; c < n; ++c) put(out + c, ot[c - full]);
  }
}

template <typename T>
void silu_mul_all(const at::Tensor& gate_up, const at::Tensor& out, int64_t n) {
  const T* gp = static_cast<const T*>(gate_up.data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  const int64_t stride = gate_up.stride(0);
  for_rows(gate_up.size(0), n, [&](int64_t row) {
    silu_mul_row<T>(gp + row * stride, gp + row * stride + n, op + row * n, n);
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0 &&
              (gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16),
              "silu_mul: gate_up must be float32 or bfloat16 [rows, 2 * n], rows contiguous");
  const int64_t n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), n}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_all<float>(gate_up, out, n);
  else
    silu_mul_all<bf16>(gate_up, out, n);
  return out;
}

// ---- rotary, then the K/V cache write -----------------------------------------------------

// One head in place: x * cos + swap_halves(x) * sin (cos = cos|cos, sin = -sin|sin), each
// product and the sum rounded to T, as the torch code's mul_, mul_, add_ round.
template <typename T>
void rotate_head(T* x, const T* cos, const T* sin, int64_t d) {
  const int64_t half = d / 2, full = half / kLanes * kLanes;
  for (int64_t c = 0; c < full; c += kLanes) {
    const v16 a = load(x + c), b = load(x + half + c);
    const v16 ra = rounded(kept(a * load(cos + c)), x) + rounded(kept(b * load(sin + c)), x);
    const v16 rb = rounded(kept(b * load(cos + half + c)), x) +
                   rounded(kept(a * load(sin + half + c)), x);
    store(x + c, ra);
    store(x + half + c, rb);
  }
  for (int64_t c = full; c < half; ++c) {
    const float a = get(x + c), b = get(x + half + c);
    const float ra = rounded(kept(a * get(cos + c)), x) + rounded(kept(b * get(sin + c)), x);
    const float rb = rounded(kept(b * get(cos + half + c)), x) +
                     rounded(kept(a * get(sin + half + c)), x);
    put(x + c, ra);
    put(x + half + c, rb);
  }
}

template <typename T>
void rotary_all(const at::Tensor& qkv, int64_t heads, int64_t d, const at::Tensor& cos,
                const at::Tensor& sin, const at::Tensor* cache, const at::Tensor* slots,
                int64_t kv_start, int64_t kv_width) {
  T* xp = static_cast<T*>(qkv.data_ptr());
  const T* cp = static_cast<const T*>(cos.data_ptr());
  const T* sp = static_cast<const T*>(sin.data_ptr());
  const int64_t stride = qkv.stride(0), cs = cos.stride(0), ss = sin.stride(0);
  T* kv = cache ? static_cast<T*>(cache->data_ptr()) : nullptr;
  const int64_t* slot = slots ? slots->data_ptr<int64_t>() : nullptr;
  for_rows(qkv.size(0), 2 * heads * d, [&](int64_t t) {
    T* row = xp + t * stride;
    for (int64_t h = 0; h < heads; ++h) rotate_head<T>(row + h * d, cp + t * cs, sp + t * ss, d);
    if (kv) std::memcpy(kv + slot[t] * kv_width, row + kv_start, kv_width * sizeof(T));
  });
}

// qkv [tokens, (heads + 2 kv_heads) * d], rows contiguous: q and k rotated in place by
// cos/sin [tokens, (1,) d]; with a cache [slots, 2, kv_heads, d], each token's k | v (the
// rotated k) then goes to its slot, as index_copy_ puts it.
void rotary_(const at::Tensor& qkv, int64_t heads, int64_t kv_heads, int64_t d,
             const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& cache,
             const std::optional<at::Tensor>& slots) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && d > 0 && d % 2 == 0 && heads >= 0 &&
              kv_heads >= 0 && qkv.size(1) >= (heads + kv_heads) * d &&
              (dtype == at::kFloat || dtype == at::kBFloat16),
              "rotary_: qkv must be float32 or bfloat16 [tokens, >= (heads + kv_heads) * d] "
              "with contiguous rows, d even");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == dtype && t->size(0) == qkv.size(0) && t->size(-1) == d &&
                t->stride(-1) == 1 && t->numel() == qkv.size(0) * d,
                "rotary_: cos and sin must be [tokens, (1,) ", d, "] of qkv's dtype");
  const int64_t rotated = heads + kv_heads, kv_width = 2 * kv_heads * d;
  if (cache.has_value() != slots.has_value())
    TORCH_CHECK(false, "rotary_: a cache comes with its slots");
  if (cache) {
    TORCH_CHECK(cache->scalar_type() == dtype && cache->is_contiguous() && cache->dim() == 4 &&
                cache->size(1) == 2 && cache->size(2) == kv_heads && cache->size(3) == d &&
                qkv.size(1) == (heads + 2 * kv_heads) * d,
                "rotary_: cache must be contiguous [slots, 2, kv_heads, d] of qkv's dtype, "
                "qkv exactly q | k | v");
    TORCH_CHECK(slots->dim() == 1 && slots->size(0) == qkv.size(0) &&
                slots->scalar_type() == at::kLong && slots->is_contiguous(),
                "rotary_: slots must be int64 [tokens]");
    const int64_t* sp = slots->data_ptr<int64_t>();
    for (int64_t t = 0; t < qkv.size(0); ++t)
      TORCH_CHECK(sp[t] >= 0 && sp[t] < cache->size(0), "rotary_: slot ", sp[t],
                  " is outside the cache's ", cache->size(0));
  }
  const at::Tensor* c = cache ? &*cache : nullptr;
  const at::Tensor* s = slots ? &*slots : nullptr;
  if (dtype == at::kFloat)
    rotary_all<float>(qkv, rotated, d, cos, sin, c, s, heads * d, kv_width);
  else
    rotary_all<bf16>(qkv, rotated, d, cos, sin, c, s, heads * d, kv_width);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_(Tensor(a!) x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_(Tensor(a!) qkv, int heads, int kv_heads, int head_dim, Tensor cos, "
        "Tensor sin, Tensor(b!)? cache, Tensor? slots) -> ()");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_", &rms_norm_);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary_", &rotary_);
}
