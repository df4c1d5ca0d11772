// Batched heterogeneous LoRA for decode on a CPU: every token of the plan has its own adapter
// (slot), and for each one y[t, cols(m)] += B_m (A_m x[t]) over the group's modules m, in
// one call per (layer, group). Weights and activations are fp32 or bf16, sums are fp32.
//
// The pool's layout (lora/slots.py) is read where it lies: slot s's `A_cat^T [in, r_tot]`
// (the modules' A's stacked along the rank) row-major at a[s], and module m's `B^T [r, out]`
// in rows s * max_rank .. + r of b[m]. The tokens of one slot go in groups of up to
// kMaxGroup, and each group reads its A and B once, as streams (B from cache after its first
// token):
//   shrink: h = A_cat x[t], the rows of A_cat^T weighted by x[t, i] summed in registers
//           (r_tot up to 192 in one pass), over fixed chunks of the `in` rows;
//   expand: per module, 256 columns of y at a time, the r rows of B^T weighted by h.
// Threads share the work by its multiply-adds: whole groups (one fork per call) when there
// are at least two per thread, else the groups' row chunks, then their runs of 16 columns
// (two forks), so that 1 to 3 groups keep every thread busy too. Every token's sums are made
// in the same order whatever its group (a group only shares the loads of A), the chunks are
// fixed by `in` alone and their partial sums are added in chunk order, so a token's result
// does not depend on the step's other tokens or on the thread count. The streams are left to
// the hardware prefetcher: software prefetches ahead in A measured slower.
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
using bf16 = c10::BFloat16;
constexpr int64_t kLanes = 16;
constexpr int kShrinkVecs = 12;  // h columns a shrink pass keeps in registers: 192
constexpr int kExpandVecs = 16;  // y columns an expand pass keeps in registers: 256
constexpr int64_t kMaxChunks = 8;  // a token's A rows are summed in up to this many chunks
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxModules = 4;
constexpr int kMaxGroup = 4;  // tokens of one slot that share their A and B loads
constexpr int kShrinkRegisters = 28;  // of the 32 vector registers, for a shrink's sums
constexpr int64_t kMaxRank = 1024;  // a module's h lives on the stack
constexpr int64_t kMinWorkPerThread = 1 << 15;  // multiply-adds a thread should get per fork

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline __mmask16 first(int64_t n) {
  return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}
inline v16 fma(v16 a, v16 b, v16 c) {
  return reinterpret_cast<v16>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                               reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
}

// 16 elements as fp32, those outside the mask read as 0 (and not read at all)
inline v16 load(const float* p, __mmask16 m) {
  return reinterpret_cast<v16>(_mm512_maskz_loadu_ps(m, p));
}
inline v16 load(const bf16* p, __mmask16 m) {
  const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(m, p);
  return reinterpret_cast<v16>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store(float* p, v16 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, reinterpret_cast<__m512>(v));
}
inline void store(bf16* p, v16 v, __mmask16 m) {  // rounded to nearest even, as torch does
  const __m512i u = reinterpret_cast<__m512i>(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v),
                                           reinterpret_cast<__m512>(v), _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

// Rows a shrink pass over nv vectors steps by, each into sums of its own, so that narrow h
// still has enough independent multiply-adds in flight to hide their latency (a function of
// nv alone: a token's sums are the same in any group).
constexpr int shrink_unroll(int nv) {
  return nv == 1 ? 8 : nv == 2 ? 4 : nv == 3 ? 3 : nv <= 7 ? 2 : 1;
}

// h_g[c] = sum over i < rows of x_g[i] * a[i * ld + c], for c < width (NV = width / 16
// rounded up) and each of the G tokens g; h_g is written in whole vectors (zeros past width).
template <typename S, int NV, int G>
void shrink(const S* const* x, const S* __restrict a, int64_t ld, int64_t rows, int64_t width,
            float* const* h) {
  constexpr int U = shrink_unroll(NV);
  v16 acc[G][U][NV];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NV; ++v) acc[g][u][v] = v16{};
  const __mmask16 tail = first(width - (NV - 1) * kLanes);
  int64_t i = 0;
  for (; i + U <= rows; i += U) {
    for (int u = 0; u < U; ++u) {
      const S* row = a + (i + u) * ld;
      v16 w[NV];
      for (int v = 0; v < NV; ++v) w[v] = load(row + v * kLanes, v == NV - 1 ? tail : 0xFFFF);
      for (int g = 0; g < G; ++g) {
        const v16 xs = v16{} + static_cast<float>(x[g][i + u]);
        for (int v = 0; v < NV; ++v) acc[g][u][v] = fma(xs, w[v], acc[g][u][v]);
      }
    }
  }
  for (; i < rows; ++i) {
    const S* row = a + i * ld;
    v16 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load(row + v * kLanes, v == NV - 1 ? tail : 0xFFFF);
    for (int g = 0; g < G; ++g) {
      const v16 xs = v16{} + static_cast<float>(x[g][i]);
      for (int v = 0; v < NV; ++v) acc[g][0][v] = fma(xs, w[v], acc[g][0][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) {
      v16 sum = acc[g][0][v];
      for (int u = 1; u < U; ++u) sum += acc[g][u][v];
      store(h[g] + v * kLanes, sum, 0xFFFF);
    }
}

// y[c] += sum over k < r of h[k] * b[k * ld + c], for c < cols (NV = cols / 16 rounded up):
// the sum is made in registers, in k order, then added to y once.
template <typename S, int NV>
void expand(const float* __restrict h, const S* __restrict b, int64_t ld, int64_t r,
            int64_t cols, S* __restrict y) {
  v16 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = v16{};
  const __mmask16 tail = first(cols - (NV - 1) * kLanes);
  for (int64_t k = 0; k < r; ++k) {
    const S* row = b + k * ld;
    const v16 hk = v16{} + h[k];
    for (int v = 0; v < NV; ++v)
      acc[v] = fma(hk, load(row + v * kLanes, v == NV - 1 ? tail : 0xFFFF), acc[v]);
  }
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = v == NV - 1 ? tail : 0xFFFF;
    store(y + v * kLanes, load(y + v * kLanes, m) + acc[v], m);
  }
}

template <typename S>
using ShrinkFn = void (*)(const S* const*, const S*, int64_t, int64_t, int64_t, float* const*);
template <typename S>
using ExpandFn = void (*)(const float*, const S*, int64_t, int64_t, int64_t, S*);

template <typename S, int G, int... N>
constexpr auto shrinks(std::integer_sequence<int, N...>) {
  return std::array<ShrinkFn<S>, sizeof...(N)>{shrink<S, N + 1, G>...};
}
template <typename S, int... G>
constexpr auto shrink_table(std::integer_sequence<int, G...>) {
  return std::array<std::array<ShrinkFn<S>, kShrinkVecs>, sizeof...(G)>{
      shrinks<S, G + 1>(std::make_integer_sequence<int, kShrinkVecs>{})...};
}
template <typename S, int... N>
constexpr auto expands(std::integer_sequence<int, N...>) {
  return std::array<ExpandFn<S>, sizeof...(N)>{expand<S, N + 1>...};
}
template <typename S>  // [G - 1][NV - 1]: the pass of G tokens over NV vectors of columns
const auto kShrinks = shrink_table<S>(std::make_integer_sequence<int, kMaxGroup>{});
template <typename S>  // [NV - 1]: the pass for NV vectors of columns
const auto kExpands = expands<S>(std::make_integer_sequence<int, kExpandVecs>{});

// Work split by cost: segment s has `units[s]` units of `weight[s]` multiply-adds each; share
// p of `parts` is the units whose first multiply-add falls in [p/parts, (p+1)/parts) of the
// total. fn(s, u0, u1) is called for each segment piece of share p.
struct Shares {
  std::vector<int64_t> units, weight, start;
  int64_t total = 0;

  explicit Shares(size_t segments) {  // reserved: no reallocation while they are added
    units.reserve(segments);
    weight.reserve(segments);
    start.reserve(segments);
  }
  void add(int64_t n, int64_t w) {
    units.push_back(n);
    weight.push_back(w);
    start.push_back(total);
    total += n * w;
  }
  int64_t parts() const {
    return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                  total / kMinWorkPerThread));
  }
  template <typename F>
  void visit(int64_t p, int64_t parts, F&& fn) const {
    const int64_t lo = total * p / parts, hi = total * (p + 1) / parts;
    for (size_t s = 0; s < units.size(); ++s) {
      const int64_t c = start[s], w = weight[s];
      if (c + units[s] * w <= lo) continue;
      if (c >= hi) break;
      const int64_t u0 = lo <= c ? 0 : div_up(lo - c, w);
      const int64_t u1 = std::min(units[s], div_up(hi - c, w));
      if (u0 < u1) fn(s, u0, u1);
    }
  }
  template <typename F>
  void run(F&& fn, int64_t n) const {
    if (n == 1) {
      visit(0, 1, fn);
      return;
    }
    at::parallel_for(0, n, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) visit(p, n, fn);
    });
  }
};

struct Token {
  int64_t t, slot, r_tot, stride;  // stride: a chunk's partial h, in floats
  int64_t r[kMaxModules], h0[kMaxModules];
  float* partial;  // [chunks][stride]
};

// Tokens of one slot (hence of the same ranks), up to kMaxGroup, that share their loads.
struct Group {
  const Token* tk[kMaxGroup];
  int g;
};

// The plan's tokens by slot, each slot's split into groups as even as kMaxGroup allows.
std::vector<Group> group_by_slot(const std::vector<Token>& tokens, int64_t nm) {
  std::vector<const Token*> order;
  order.reserve(tokens.size());
  for (const Token& tk : tokens) order.push_back(&tk);
  std::stable_sort(order.begin(), order.end(),
                   [](const Token* p, const Token* q) { return p->slot < q->slot; });
  std::vector<Group> groups;
  groups.reserve(tokens.size());
  for (size_t i = 0; i < order.size();) {
    size_t e = i + 1;
    while (e < order.size() && order[e]->slot == order[i]->slot &&
           std::equal(order[e]->r, order[e]->r + nm, order[i]->r))
      ++e;
    const int64_t n = int64_t(e - i), parts = div_up(n, kMaxGroup);
    for (int64_t p = 0; p < parts; ++p) {
      Group gr{};
      const int64_t lo = n * p / parts, hi = n * (p + 1) / parts;
      for (int64_t k = lo; k < hi; ++k) gr.tk[gr.g++] = order[i + k];
      groups.push_back(gr);
    }
    i = e;
  }
  return groups;
}

// Tokens a shrink pass over nv vectors takes at once: their sums stay in registers.
inline int shrink_group(int nv) {
  return std::max(1, std::min(kMaxGroup, kShrinkRegisters / (shrink_unroll(nv) * nv)));
}

template <typename S>
void run(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, at::TensorList b,
         const at::Tensor& plan, at::IntArrayRef col_starts) {
  const int64_t T = x.size(0), in = x.size(1), nm = int64_t(b.size()), n = plan.size(0);
  const int64_t num_slots = a.size(0), cap = a.size(1) / in;
  const int64_t max_rank = b[0].size(0) / num_slots;
  const int64_t ldx = x.stride(0), ldy = y.stride(0), lda = a.size(1);
  const int64_t* pp = plan.data_ptr<int64_t>();

  // the calling thread's scratch, reused call after call: warm in its cache, not fresh
  // memory that every first write misses (a step makes 120 of these calls)
  static thread_local std::vector<Token> tokens;
  static thread_local std::vector<char> seen;
  static thread_local std::vector<float> partials;
  tokens.assign(n, Token{});
  seen.assign(T, 0);
  int64_t floats = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = pp + i * (2 + nm);
    Token& tk = tokens[i];
    tk.t = row[0];
    tk.slot = row[1];
    TORCH_CHECK(tk.t >= 0 && tk.t < T && !seen[tk.t], "lora_bgmv: plan row ", i, ": token ",
                tk.t, " out of range or repeated");
    seen[tk.t] = 1;
    TORCH_CHECK(tk.slot >= 0 && tk.slot < num_slots, "lora_bgmv: plan row ", i, ": slot ",
                tk.slot, " out of range");
    tk.r_tot = 0;
    for (int64_t j = 0; j < nm; ++j) {
      tk.r[j] = row[2 + j];
      TORCH_CHECK(tk.r[j] >= 0 && tk.r[j] <= max_rank, "lora_bgmv: rank ", tk.r[j],
                  " out of range");
      tk.h0[j] = tk.r_tot;
      tk.r_tot += tk.r[j];
    }
    TORCH_CHECK(tk.r_tot > 0 && tk.r_tot <= cap, "lora_bgmv: plan row ", i, ": ranks sum to ",
                tk.r_tot, ", not in 1..", cap);
    tk.stride = div_up(tk.r_tot, kLanes) * kLanes;
    floats += tk.stride;
  }
  const int64_t chunks = std::max<int64_t>(1, std::min(kMaxChunks, in / kMinChunkRows));
  partials.resize(floats * chunks);
  floats = 0;
  for (Token& tk : tokens) {
    tk.partial = partials.data() + floats * chunks;
    floats += tk.stride;
  }
  const std::vector<Group> groups = group_by_slot(tokens, nm);

  const S* xp = static_cast<const S*>(x.data_ptr());
  const S* ap = static_cast<const S*>(a.data_ptr());
  S* yp = static_cast<S*>(y.data_ptr());

  // a group's chunks [c0, c1) of its shrink, into its tokens' partial sums
  auto shrink_chunks = [&](const Group& gr, int64_t c0, int64_t c1) {
    const Token& lead = *gr.tk[0];
    const S* xs[kMaxGroup];
    float* hs[kMaxGroup];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = in * c / chunks, i1 = in * (c + 1) / chunks;
      const S* ar = ap + lead.slot * lda + i0 * lead.r_tot;
      for (int64_t k0 = 0; k0 < lead.r_tot; k0 += kShrinkVecs * kLanes) {
        const int64_t width = std::min<int64_t>(kShrinkVecs * kLanes, lead.r_tot - k0);
        const int nv = int(div_up(width, kLanes));
        const int most = shrink_group(nv);
        for (int g0 = 0; g0 < gr.g; g0 += most) {
          const int g = std::min(most, gr.g - g0);
          for (int k = 0; k < g; ++k) {
            xs[k] = xp + gr.tk[g0 + k]->t * ldx + i0;
            hs[k] = gr.tk[g0 + k]->partial + c * lead.stride + k0;
          }
          kShrinks<S>[g - 1][nv - 1](xs, ar + k0, lead.r_tot, i1 - i0, width, hs);
        }
      }
    }
  };
  // module j of a group, its columns [16 u0, 16 u1): each token's h (the chunks' sums, in
  // order), then 256 columns at a time (B, read by the group's first token, is in cache for
  // the others: sharing its loads too measured no faster)
  auto expand_units = [&](const Group& gr, int64_t j, int64_t u0, int64_t u1) {
    const Token& lead = *gr.tk[0];
    const int64_t r = lead.r[j], out = b[j].size(1);
    const S* bj = static_cast<const S*>(b[j].data_ptr()) + lead.slot * max_rank * out;
    const int64_t end = std::min(u1 * kLanes, out);
    float h[kMaxRank];
    for (int g = 0; g < gr.g; ++g) {
      const Token& tk = *gr.tk[g];
      for (int64_t k = 0; k < r; ++k) {
        float sum = 0.f;
        for (int64_t c = 0; c < chunks; ++c) sum += tk.partial[c * tk.stride + tk.h0[j] + k];
        h[k] = sum;
      }
      S* yj = yp + tk.t * ldy + col_starts[j];
      for (int64_t c = u0 * kLanes; c < end; c += kExpandVecs * kLanes) {
        const int64_t cols = std::min<int64_t>(kExpandVecs * kLanes, end - c);
        kExpands<S>[div_up(cols, kLanes) - 1](h, bj + c, out, r, cols, yj + c);
      }
    }
  };
  auto whole_group = [&](const Group& gr) {
    shrink_chunks(gr, 0, chunks);
    for (int64_t j = 0; j < nm; ++j)
      if (gr.tk[0]->r[j] > 0) expand_units(gr, j, 0, div_up(b[j].size(1), kLanes));
  };

  // Costs in multiply-adds: a shrink chunk, and 16 columns of an expand (with their y)
  const int64_t chunk_rows = div_up(in, chunks);
  Shares shrink_work(groups.size()), expand_work(groups.size() * nm), group_work(groups.size());
  struct Piece { const Group* gr; int64_t j; };
  std::vector<Piece> pieces;
  pieces.reserve(groups.size() * nm);
  for (const Group& gr : groups) {
    const Token& lead = *gr.tk[0];
    int64_t cost = chunks * chunk_rows * lead.stride * gr.g;
    shrink_work.add(chunks, chunk_rows * lead.stride * gr.g);
    for (int64_t j = 0; j < nm; ++j)
      if (lead.r[j] > 0) {
        const int64_t units = div_up(b[j].size(1), kLanes), w = (lead.r[j] + 2) * kLanes * gr.g;
        pieces.push_back({&gr, j});
        expand_work.add(units, w);
        cost += units * w;
      }
    group_work.add(1, cost);
  }
  const int64_t parts = group_work.parts(), n_groups = int64_t(groups.size());
  if (parts == 1) {
    for (const Group& gr : groups) whole_group(gr);
  } else if (n_groups >= 2 * parts) {
    // enough groups to share out whole: one fork, and each token's h stays in its thread
    group_work.run([&](size_t s, int64_t, int64_t) { whole_group(groups[s]); }, parts);
  } else {  // a few groups: their chunks, then their columns, over every thread
    shrink_work.run([&](size_t s, int64_t c0, int64_t c1) {
      shrink_chunks(groups[s], c0, c1);
    }, parts);
    expand_work.run([&](size_t s, int64_t u0, int64_t u1) {
      expand_units(*pieces[s].gr, pieces[s].j, u0, u1);
    }, parts);
  }
}

void lora_bgmv(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
               at::TensorList b, const at::Tensor& plan, at::IntArrayRef col_starts) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "lora_bgmv: float32 or bfloat16 only, not ", dtype);
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.stride(1) == 1 &&
              y.stride(1) == 1, "lora_bgmv: x [T, in] and y [T, out] with unit column stride");
  TORCH_CHECK(y.scalar_type() == dtype && a.scalar_type() == dtype,
              "lora_bgmv: x, y and the weights must share a dtype");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && x.size(1) > 0 && a.size(1) % x.size(1) == 0,
              "lora_bgmv: a must be contiguous [num_slots, in * cap]");
  const int64_t nm = int64_t(b.size());
  TORCH_CHECK(nm >= 1 && nm <= kMaxModules && int64_t(col_starts.size()) == nm,
              "lora_bgmv: 1 to ", kMaxModules, " modules, one column start each");
  TORCH_CHECK(plan.dim() == 2 && plan.size(1) == 2 + nm && plan.scalar_type() == at::kLong &&
              plan.is_contiguous(), "lora_bgmv: plan must be int64 [n, 2 + modules]");
  for (int64_t j = 0; j < nm; ++j) {
    TORCH_CHECK(b[j].dim() == 2 && b[j].is_contiguous() && b[j].scalar_type() == dtype &&
                b[j].size(0) == b[0].size(0) && b[0].size(0) % a.size(0) == 0,
                "lora_bgmv: b[", j, "] must be contiguous [num_slots * max_rank, out]");
    TORCH_CHECK(col_starts[j] >= 0 && col_starts[j] + b[j].size(1) <= y.size(1),
                "lora_bgmv: module ", j, "'s columns are outside y");
  }
  TORCH_CHECK(b[0].size(0) / a.size(0) <= kMaxRank, "lora_bgmv: max_rank above ", kMaxRank);
  if (plan.size(0) == 0) return;
  if (dtype == at::kFloat)
    run<float>(x, y, a, b, plan, col_starts);
  else
    run<bf16>(x, y, a, b, plan, col_starts);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("lora_bgmv(Tensor x, Tensor(a!) y, Tensor a, Tensor[] b, Tensor plan, "
        "int[] col_starts) -> ()");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("lora_bgmv", &lora_bgmv);
}
