// Ext-Sub's closed form on CPU rows (paper §3, Algorithm 1; docs/design.md §1):
//     p' = α·p + β·m,   α = 1 + (λ/2)·|m|/|p|,   β = −λ/2;   rows with |p| = 0 keep p.
//
// Plain C++17 with no torch or Python headers, so it builds in seconds (five here); ext_sub_cpu.py
// compiles it at first use and calls it through ctypes on raw pointers (ctypes drops the GIL,
// so Python threads share the rows, claiming chunks as they go). Per row: one loop loads p and
// m, widens them in registers (bf16/fp16 → float32) and accumulates both sums of squares; a
// second loop over the same row, still in cache for rows up to a few hundred KB, writes
// α·p + β·m rounded once to p's dtype while it prefetches the next row. Memory sees read p,
// read m, write p: the copy floor.
//
// Row sums (docs/design.md §7): on request the first loop also accumulates p·m, and the row's |p|²,
// |m|² and p·m (before the update) are stored in a (rows, 3) float32 or float64 array; with
// update = 0 only the sums are taken (ops.row_products).
//
// Dtype codes: 0 float16, 1 bfloat16, 2 float32, 3 float64. Arithmetic is in float32, or in
// float64 when either operand is float64. Sums go in float32 lanes over blocks of kSumBlock
// elements and blocks add up in float64, so a row of 2^30 elements loses no accuracy.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>

// float16 ↔ float32: F16C vector instructions on x86 (eight or sixteen values per instruction,
// exact, round to nearest even), the compiler's _Float16 on other targets that have it, the
// bit-level conversions below otherwise and for single values. EXTSUB_SOFT_F16 forces the
// bit-level ones (tests compare the two builds bit for bit).
#if defined(__F16C__) && !defined(EXTSUB_SOFT_F16)
#include <immintrin.h>
#define EXTSUB_F16C 1
#elif defined(__FLT16_MAX__) && !defined(EXTSUB_SOFT_F16) && !defined(__x86_64__) && !defined(__i386__)
#define EXTSUB_NATIVE_F16 1
#endif

#if defined(_WIN32)
#define EXTSUB_EXPORT extern "C" __declspec(dllexport)
#else
#define EXTSUB_EXPORT extern "C" __attribute__((visibility("default")))
#endif

namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Dtype tags for the two 16-bit formats; float and double stand for themselves.
struct Half {};
struct BFloat16 {};

// Format<T>: S is what memory holds, widen() gives float (double for float64) and narrow()
// rounds a computed value once back to S. 16-bit formats are plain integers or _Float16 in
// memory, so the compiler vectorizes their loads and stores.
template <typename T>
struct Format {
  using S = T;
  static T widen(T x) { return x; }
  template <typename C>
  static T narrow(C x) {
    return static_cast<T>(x);
  }
};

template <>
struct Format<BFloat16> {
  using S = uint16_t;
  static float widen(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
  // Round to nearest even; NaN → 0x7FC0 (as c10::BFloat16).
  template <typename C>
  static uint16_t narrow(C x) {
    const uint32_t u = float_to_bits(static_cast<float>(x));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
};

#if defined(EXTSUB_NATIVE_F16)
// The compiler's half type, where the target converts in hardware (Arm, for one).
template <>
struct Format<Half> {
  using S = _Float16;
  static float widen(_Float16 h) { return static_cast<float>(h); }
  template <typename C>
  static _Float16 narrow(C x) {
    return static_cast<_Float16>(static_cast<float>(x));
  }
};
#else
// Exact bit-level conversions (F. Giesen's float ↔ half; round to nearest even, NaN → quiet
// NaN): single values beside F16C's vectors on x86, and everything where neither applies.
template <>
struct Format<Half> {
  using S = uint16_t;
  static float widen(uint16_t h) {
    float f = bits_to_float((h & 0x7FFFu) << 13) * 0x1p112f;  // rebias 15 → 127; subnormals come out normal
    uint32_t u = float_to_bits(f);
    if (f >= 65536.0f) u |= 0xFFu << 23;  // Inf and NaN keep an all-ones exponent
    return bits_to_float(u | (static_cast<uint32_t>(h & 0x8000u) << 16));
  }
  template <typename C>
  static uint16_t narrow(C x) {
    uint32_t u = float_to_bits(static_cast<float>(x));
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t out;
    if (u >= (127u + 16u) << 23) {  // overflows half: Inf, or NaN stays a quiet NaN
      out = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
    } else if (u < (113u << 23)) {  // half subnormal or zero: let the float adder round
      const uint32_t magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
      out = float_to_bits(bits_to_float(u) + bits_to_float(magic_bits)) - magic_bits;
    } else {
      const uint32_t mant_odd = (u >> 13) & 1u;
      u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mant_odd;
      out = u >> 13;
    }
    return static_cast<uint16_t>(out | (sign >> 16));
  }
};
#endif

template <typename T>
using Stored = typename Format<T>::S;

// A vector loop's N values (a multiple of 16) of one operand, widened to C: read in place, or
// for float16 on x86 converted by F16C, a whole vector register at a time (with AVX-512, 16
// values: the loop's loads of `values` then forward from same-sized stores, never split ones).
template <typename T, typename C, int N>
struct Loaded {
  const Stored<T>* src;
  explicit Loaded(const Stored<T>* from) : src(from) {}
  C operator[](int k) const { return static_cast<C>(Format<T>::widen(src[k])); }
};

// Where a vector loop's N results go, each rounded once to T: straight to memory, or for
// float16 on x86 gathered and converted a vector register at a time by F16C (round to nearest even).
template <typename T, typename C, int N>
struct Narrowed {
  Stored<T>* dst;
  explicit Narrowed(Stored<T>* to) : dst(to) {}
  void set(int k, C x) { dst[k] = Format<T>::narrow(x); }
  void flush() {}
};

#if defined(EXTSUB_F16C)
template <typename C, int N>
struct Loaded<Half, C, N> {
  C values[N];
  explicit Loaded(const uint16_t* from) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<C, float>) {  // whole vector registers: stores the loop's loads can forward
      for (int k = 0; k < N; k += 16) {
        _mm512_storeu_ps(values + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + k))));
      }
      return;
    }
#endif
    for (int k = 0; k < N; k += 8) {
      const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + k)));
      if constexpr (std::is_same_v<C, float>) {
        _mm256_storeu_ps(values + k, wide);
      } else {
        float floats[8];
        _mm256_storeu_ps(floats, wide);
        for (int i = 0; i < 8; ++i) values[k + i] = floats[i];
      }
    }
  }
  C operator[](int k) const { return values[k]; }
};

template <typename C, int N>
struct Narrowed<Half, C, N> {
  uint16_t* dst;
  float values[N];  // C = double rounds to float first, as the single-value path does
  explicit Narrowed(uint16_t* to) : dst(to) {}
  void set(int k, C x) { values[k] = static_cast<float>(x); }
  void flush() {
#if defined(__AVX512F__)
    for (int k = 0; k < N; k += 16) {
      const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(values + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), h);
    }
#else
    for (int k = 0; k < N; k += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(values + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), h);
    }
#endif
  }
};
#endif

// Elements per block of the float32 lanes; blocks add up in float64.
constexpr int64_t kSumBlock = 4096;

// The sums of a stretch of a row: Σp², Σm² and, when asked, Σp·m.
struct Sums {
  double pp = 0.0, mm = 0.0, pm = 0.0;
};

// The float32 (C) lanes of one block of at most kSumBlock elements: lane k sums the terms of
// elements k, k + kLanes, ... in order; a stretch shorter than kLanes goes to lane 0. `into`
// adds the lanes up in float64. Every path sums this way, so a row's sums do not depend on
// whether its values come straight from p and m or from p − θ₀ and m − θ₀ (the fused pass).
template <typename C, bool kDot>
struct LaneSums {
  static constexpr int kLanes = 128 / sizeof(C);
  C p[kLanes] = {};
  C m[kLanes] = {};
  C pm[kLanes] = {};
  // kLanes values of each: anything indexable by 0 … kLanes − 1 (a Loaded, a pointer).
  template <typename A, typename B>
  void lanes(const A& a, const B& b) {
    for (int k = 0; k < kLanes; ++k) {
      const C x = a[k], y = b[k];
      p[k] += x * x;
      m[k] += y * y;
      if constexpr (kDot) pm[k] += x * y;
    }
  }
  void one(C x, C y) {
    p[0] += x * x;
    m[0] += y * y;
    if constexpr (kDot) pm[0] += x * y;
  }
  void into(Sums& s) const {
    double bp = 0.0, bm = 0.0, bpm = 0.0;
    for (int k = 0; k < kLanes; ++k) {
      bp += static_cast<double>(p[k]);
      bm += static_cast<double>(m[k]);
      if constexpr (kDot) bpm += static_cast<double>(pm[k]);
    }
    s.pp += bp;
    s.mm += bm;
    s.pm += bpm;
  }
};

// Adds Σp², Σm² (and Σp·m with kDot) over n elements to s, in the lanes of LaneSums.
template <typename C, typename P, typename M, bool kDot>
void row_sums(const Stored<P>* p, const Stored<M>* m, int64_t n, Sums& s) {
  constexpr int kLanes = LaneSums<C, kDot>::kLanes;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t len = n - start < kSumBlock ? n - start : kSumBlock;
    const Stored<P>* pb = p + start;
    const Stored<M>* mb = m + start;
    LaneSums<C, kDot> acc;
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) acc.lanes(Loaded<P, C, kLanes>(pb + j), Loaded<M, C, kLanes>(mb + j));
    for (; j < len; ++j) acc.one(Format<P>::widen(pb[j]), Format<M>::widen(mb[j]));
    acc.into(s);
  }
}

// Where a call's row sums go: a (rows, 3) array of float32 (dtype 2) or float64 (dtype 3), or nowhere.
struct StatsOut {
  void* ptr;
  int dtype;
  bool wanted() const { return ptr != nullptr; }
  void store(int64_t row, const Sums& s) const {
    if (dtype == 3) {
      double* out = static_cast<double*>(ptr) + 3 * row;
      out[0] = s.pp, out[1] = s.mm, out[2] = s.pm;
    } else {
      float* out = static_cast<float*>(ptr) + 3 * row;
      out[0] = static_cast<float>(s.pp), out[1] = static_cast<float>(s.mm), out[2] = static_cast<float>(s.pm);
    }
  }
};

template <typename C, typename P, typename M>
void sums_of(const Stored<P>* p, const Stored<M>* m, int64_t n, bool dot, Sums& s) {
  if (dot) {
    row_sums<C, P, M, true>(p, m, n, s);
  } else {
    row_sums<C, P, M, false>(p, m, n, s);
  }
}

// Asks for the cache lines of [from, from + bytes) ahead of their use.
inline void prefetch(const void* from, int bytes) {
  for (int b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(from) + b);
}

// p[j] ← α·p[j] + β·m[j] for j < n, computed in C and rounded once to P. With next_p and
// next_m (the next row), each step also prefetches the same stretch of the next row, so
// memory keeps streaming while this row, already in cache, is updated.
template <typename C, typename P, typename M>
void update(Stored<P>* __restrict p, const Stored<M>* __restrict m, int64_t n, C alpha, C beta,
            const Stored<P>* next_p = nullptr, const Stored<M>* next_m = nullptr) {
  constexpr int kLanes = 128 / sizeof(C);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    if (next_p != nullptr) {
      prefetch(next_p + j, kLanes * sizeof(Stored<P>));
      prefetch(next_m + j, kLanes * sizeof(Stored<M>));
    }
    const Loaded<P, C, kLanes> pv(p + j);
    const Loaded<M, C, kLanes> mv(m + j);
    Narrowed<P, C, kLanes> out(p + j);
    for (int k = 0; k < kLanes; ++k) out.set(k, alpha * pv[k] + beta * mv[k]);
    out.flush();
  }
  for (; j < n; ++j) {
    p[j] = Format<P>::narrow(alpha * static_cast<C>(Format<P>::widen(p[j])) +
                             beta * static_cast<C>(Format<M>::widen(m[j])));
  }
}

template <typename P, typename M>
using Compute = std::conditional_t<std::is_same_v<P, double> || std::is_same_v<M, double>, double, float>;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<P>{}, Tag<M>{}) for the dtype codes of p and m; −1 for an unknown code.
template <typename F>
int with_dtypes(int p_dtype, int m_dtype, F&& f) {
  auto with_m = [&](auto p_tag) -> int {
    switch (m_dtype) {
      case 0: return f(p_tag, Tag<Half>{}), 0;
      case 1: return f(p_tag, Tag<BFloat16>{}), 0;
      case 2: return f(p_tag, Tag<float>{}), 0;
      case 3: return f(p_tag, Tag<double>{}), 0;
      default: return -1;
    }
  };
  switch (p_dtype) {
    case 0: return with_m(Tag<Half>{});
    case 1: return with_m(Tag<BFloat16>{});
    case 2: return with_m(Tag<float>{});
    case 3: return with_m(Tag<double>{});
    default: return -1;
  }
}

// α = 1 + (λ/2)·|m|/|p| of a row with |p| > 0, from its sums, in float64 (then rounded once to the compute type).
inline double alpha_of(const Sums& s, double half_lam) { return 1.0 + half_lam * (std::sqrt(s.mm) / std::sqrt(s.pp)); }

// Rows [r0, r1) of the (rows, n_cols) views p and m: both norms (and the row sums, if wanted),
// then p ← α·p + β·m in place unless only the sums were asked for.
template <typename P, typename M>
void rows_in_place(Stored<P>* p, const Stored<M>* m, int64_t r0, int64_t r1, int64_t n_cols, int64_t p_row_stride,
                   int64_t m_row_stride, double half_lam, StatsOut stats, bool write) {
  using C = Compute<P, M>;
  for (int64_t r = r0; r < r1; ++r) {
    Stored<P>* pr = p + r * p_row_stride;
    const Stored<M>* mr = m + r * m_row_stride;
    Sums s;
    sums_of<C, P, M>(pr, mr, n_cols, stats.wanted(), s);
    if (stats.wanted()) stats.store(r, s);
    if (!write || s.pp == 0.0) continue;  // |p| = 0: the row stays (α = 1, β = 0)
    const double alpha = alpha_of(s, half_lam);
    const bool more = r + 1 < r1;
    update<C, P, M>(pr, mr, n_cols, static_cast<C>(alpha), static_cast<C>(-half_lam), more ? pr + p_row_stride : nullptr,
                    more ? mr + m_row_stride : nullptr);
  }
}

// Work sharing between the threads of one call. Each thread claims the next chunk from
// counters[0] until none is left and adds what it finished to counters[1]; the calling thread
// (wait = 1) then waits until every claimed chunk is finished. A thread that starts late, or is
// descheduled on a busy machine, only leaves its share to the others: nobody waits for a
// thread that has not claimed anything, and one that starts after the end touches no data.
template <typename Body>
void claim_chunks(int64_t n_chunks, int64_t* counters, int wait, Body&& body) {
  for (;;) {
    const int64_t k = __atomic_fetch_add(&counters[0], 1, __ATOMIC_RELAXED);
    if (k >= n_chunks) break;
    body(k);
    __atomic_fetch_add(&counters[1], 1, __ATOMIC_RELEASE);
  }
  if (!wait) return;
  for (int spins = 0; __atomic_load_n(&counters[1], __ATOMIC_ACQUIRE) < n_chunks; ++spins) {
    if (spins < 2048) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// ---- The fused pass on task vectors (docs/design.md §5): out = θ₀ + (p − θ₀) − λ·Ext(m − θ₀) ----
//
// p, m and θ₀ are read in their own dtypes and out written in its own, each of the four any of
// the dtype codes, so the arithmetic is written once per compute type (float32, or float64 when
// p, m or θ₀ is float64) and each operand is widened or rounded a tile at a time through a
// switch on its dtype code. Per row: a first loop widens a tile of each, forms p − θ₀ and
// m − θ₀ in C and adds their sums to the lanes of LaneSums (so the sums are those of the op on
// the widened task vectors, bit for bit); a second loop over the same row, in cache, widens
// again and writes θ₀ + (α·(p − θ₀) + β·(m − θ₀)), rounded once to out's dtype, while it
// prefetches the next row. Memory sees read p, m, θ₀ and write out once each.

// Elements per tile: a multiple of every LaneSums width that divides kSumBlock.
constexpr int kTile = 256;

inline int64_t item_size(int dtype) { return dtype == 3 ? 8 : dtype == 2 ? 4 : 2; }

// Calls f(Tag<T>{}) for one dtype code.
template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(Tag<Half>{});
    case 1: return f(Tag<BFloat16>{});
    case 2: return f(Tag<float>{});
    default: return f(Tag<double>{});
  }
}

// One operand of the fused pass: a (rows, n_cols) view with contiguous columns.
struct Operand {
  const void* data;
  int dtype;
  int64_t row_stride;  // elements
  const char* at(int64_t row, int64_t col) const {
    return static_cast<const char*>(data) + (row * row_stride + col) * item_size(dtype);
  }
};

// n values of T at src widened to C into dst: whole vectors as the op loads them, then one by one.
template <typename T, typename C>
void widen_into(const Stored<T>* src, int n, C* dst) {
  constexpr int kLanes = 128 / sizeof(C);
  int k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    const Loaded<T, C, kLanes> v(src + k);
    for (int i = 0; i < kLanes; ++i) dst[k + i] = v[i];
  }
  for (; k < n; ++k) dst[k] = static_cast<C>(Format<T>::widen(src[k]));
}

// n values of C rounded once to T: whole vectors as the op stores them, then one by one.
template <typename T, typename C>
void narrow_into(const C* src, int n, Stored<T>* dst) {
  constexpr int kLanes = 128 / sizeof(C);
  int k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    Narrowed<T, C, kLanes> out(dst + k);
    for (int i = 0; i < kLanes; ++i) out.set(i, src[k + i]);
    out.flush();
  }
  for (; k < n; ++k) dst[k] = Format<T>::narrow(src[k]);
}

// One tile of a row, widened to C: the task vectors p − θ₀ and m − θ₀, and θ₀.
template <typename C>
struct TaskTile {
  alignas(64) C p[kTile];
  alignas(64) C m[kTile];
  alignas(64) C base[kTile];

  void load(const Operand* in, int64_t row, int64_t col, int n) {
    widen(in[2], row, col, n, base);
    widen(in[0], row, col, n, p);
    widen(in[1], row, col, n, m);
    for (int k = 0; k < n; ++k) {
      p[k] -= base[k];
      m[k] -= base[k];
    }
  }

  static void widen(const Operand& x, int64_t row, int64_t col, int n, C* dst) {
    with_dtype(x.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      widen_into<T, C>(reinterpret_cast<const Stored<T>*>(x.at(row, col)), n, dst);
    });
  }
};

// Σ(p − θ₀)², Σ(m − θ₀)² (and the dot product with kDot) of one row, in the op's lanes and blocks.
template <typename C, bool kDot>
void task_sums(const Operand* in, int64_t row, int64_t n, TaskTile<C>& tile, Sums& s) {
  constexpr int kLanes = LaneSums<C, kDot>::kLanes;
  static_assert(kTile % kLanes == 0 && kSumBlock % kTile == 0, "tiles split neither lanes nor blocks");
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t len = n - start < kSumBlock ? n - start : kSumBlock;
    LaneSums<C, kDot> acc;
    for (int64_t t = 0; t < len; t += kTile) {
      const int count = static_cast<int>(len - t < kTile ? len - t : kTile);
      tile.load(in, row, start + t, count);
      int k = 0;
      for (; k + kLanes <= count; k += kLanes) acc.lanes(tile.p + k, tile.m + k);
      for (; k < count; ++k) acc.one(tile.p[k], tile.m[k]);
    }
    acc.into(s);
  }
}

// out's row ← θ₀ + (α·(p − θ₀) + β·(m − θ₀)), or θ₀ + (p − θ₀) when `keep` (|p − θ₀| = 0), each
// rounded as the op and the workspace path round it; the next row (if any) is prefetched.
template <typename C>
void task_update(const Operand* in, const Operand& out, int64_t row, int64_t n, C alpha, C beta, bool keep, bool more,
                 TaskTile<C>& tile) {
  for (int64_t col = 0; col < n; col += kTile) {
    const int count = static_cast<int>(n - col < kTile ? n - col : kTile);
    if (more) {
      for (int i = 0; i < 3; ++i) prefetch(in[i].at(row + 1, col), static_cast<int>(count * item_size(in[i].dtype)));
    }
    tile.load(in, row, col, count);
    if (keep) {
      for (int k = 0; k < count; ++k) tile.p[k] = tile.p[k] + tile.base[k];
    } else {
      for (int k = 0; k < count; ++k) {
        const C r = alpha * tile.p[k] + beta * tile.m[k];
        tile.p[k] = r + tile.base[k];
      }
    }
    with_dtype(out.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      narrow_into<T, C>(tile.p, count, reinterpret_cast<Stored<T>*>(const_cast<char*>(out.at(row, col))));
    });
  }
}

// Rows [r0, r1) of the fused pass; in = {p, m, θ₀}.
template <typename C>
void task_rows(const Operand* in, const Operand& out, int64_t r0, int64_t r1, int64_t n_cols, double half_lam,
               StatsOut stats) {
  TaskTile<C> tile;
  for (int64_t r = r0; r < r1; ++r) {
    Sums s;
    if (stats.wanted()) {
      task_sums<C, true>(in, r, n_cols, tile, s);
      stats.store(r, s);
    } else {
      task_sums<C, false>(in, r, n_cols, tile, s);
    }
    const bool keep = s.pp == 0.0;  // |p − θ₀| = 0: the task vector stays (α = 1, β = 0)
    const double alpha = keep ? 1.0 : alpha_of(s, half_lam);
    task_update<C>(in, out, r, n_cols, static_cast<C>(alpha), static_cast<C>(-half_lam), keep, r + 1 < r1, tile);
  }
}

}  // namespace

// Rows [row_begin, row_end) of the (rows, n_cols) views p and m (columns contiguous, rows
// p_row_stride and m_row_stride elements apart), on the calling thread alone. stats: null, or
// the (rows, 3) row sums array of stats_dtype (2 float32, 3 float64); write = 0: sums only.
// Returns 0, or −1 for an unknown dtype code.
EXTSUB_EXPORT int extsub_rows(void* p, const void* m, int p_dtype, int m_dtype, int64_t row_begin,
                              int64_t row_end, int64_t n_cols, int64_t p_row_stride, int64_t m_row_stride,
                              double half_lam, void* stats, int stats_dtype, int write) {
  return with_dtypes(p_dtype, m_dtype, [&](auto p_tag, auto m_tag) {
    using P = typename decltype(p_tag)::type;
    using M = typename decltype(m_tag)::type;
    rows_in_place<P, M>(static_cast<Stored<P>*>(p), static_cast<const Stored<M>*>(m), row_begin, row_end, n_cols,
                        p_row_stride, m_row_stride, half_lam, StatsOut{stats, stats_dtype}, write != 0);
  });
}

// All n_rows rows, in chunks of chunk_rows claimed by every thread that calls this with the
// same counters (two zeroed int64: next chunk, chunks finished); see claim_chunks.
EXTSUB_EXPORT int extsub_rows_shared(void* p, const void* m, int p_dtype, int m_dtype, int64_t n_rows,
                                     int64_t n_cols, int64_t p_row_stride, int64_t m_row_stride, double half_lam,
                                     void* stats, int stats_dtype, int write, int64_t chunk_rows, int64_t* counters,
                                     int wait) {
  return with_dtypes(p_dtype, m_dtype, [&](auto p_tag, auto m_tag) {
    using P = typename decltype(p_tag)::type;
    using M = typename decltype(m_tag)::type;
    const int64_t n_chunks = (n_rows + chunk_rows - 1) / chunk_rows;
    claim_chunks(n_chunks, counters, wait, [&](int64_t k) {
      const int64_t r0 = k * chunk_rows;
      const int64_t r1 = r0 + chunk_rows < n_rows ? r0 + chunk_rows : n_rows;
      rows_in_place<P, M>(static_cast<Stored<P>*>(p), static_cast<const Stored<M>*>(m), r0, r1, n_cols, p_row_stride,
                          m_row_stride, half_lam, StatsOut{stats, stats_dtype}, write != 0);
    });
  });
}

// First pass over one row too long for one thread (contiguous p and m of n elements): chunk k
// of chunk elements writes its Σp², Σm² and (dot ≠ 0) Σp·m to partials[3k], [3k + 1], [3k + 2].
EXTSUB_EXPORT int extsub_sums_shared(const void* p, const void* m, int p_dtype, int m_dtype, int64_t n,
                                     int64_t chunk, int dot, double* partials, int64_t* counters, int wait) {
  return with_dtypes(p_dtype, m_dtype, [&](auto p_tag, auto m_tag) {
    using P = typename decltype(p_tag)::type;
    using M = typename decltype(m_tag)::type;
    claim_chunks((n + chunk - 1) / chunk, counters, wait, [&](int64_t k) {
      const int64_t begin = k * chunk;
      const int64_t len = begin + chunk < n ? chunk : n - begin;
      Sums s;
      sums_of<Compute<P, M>, P, M>(static_cast<const Stored<P>*>(p) + begin, static_cast<const Stored<M>*>(m) + begin,
                                   len, dot != 0, s);
      partials[3 * k] = s.pp;
      partials[3 * k + 1] = s.mm;
      partials[3 * k + 2] = s.pm;
    });
  });
}

// Second pass over that row: p ← α·p + β·m, chunk by chunk.
EXTSUB_EXPORT int extsub_update_shared(void* p, const void* m, int p_dtype, int m_dtype, int64_t n, int64_t chunk,
                                       double alpha, double beta, int64_t* counters, int wait) {
  return with_dtypes(p_dtype, m_dtype, [&](auto p_tag, auto m_tag) {
    using P = typename decltype(p_tag)::type;
    using M = typename decltype(m_tag)::type;
    using C = Compute<P, M>;
    claim_chunks((n + chunk - 1) / chunk, counters, wait, [&](int64_t k) {
      const int64_t begin = k * chunk;
      const int64_t len = begin + chunk < n ? chunk : n - begin;
      update<C, P, M>(static_cast<Stored<P>*>(p) + begin, static_cast<const Stored<M>*>(m) + begin, len, static_cast<C>(alpha),
                static_cast<C>(beta));
    });
  });
}

// The fused pass on task vectors over all n_rows rows of the (rows, n_cols) views out, p, m and
// base (columns contiguous; row strides in elements; out overlaps none of the others), in
// chunks of chunk_rows claimed by every thread that calls this with the same counters (see
// claim_chunks): out = base + (p − base) − λ·Ext(m − base), the row sums of p − base and
// m − base into stats as extsub_rows gives them. Returns 0, or −1 for an unknown dtype code.
EXTSUB_EXPORT int extsub_task_rows_shared(void* out, const void* p, const void* m, const void* base, int out_dtype,
                                          int p_dtype, int m_dtype, int base_dtype, int64_t n_rows, int64_t n_cols,
                                          int64_t out_row_stride, int64_t p_row_stride, int64_t m_row_stride,
                                          int64_t base_row_stride, double half_lam, void* stats, int stats_dtype,
                                          int64_t chunk_rows, int64_t* counters, int wait) {
  const int codes[4] = {out_dtype, p_dtype, m_dtype, base_dtype};
  for (const int code : codes) {
    if (code < 0 || code > 3) return -1;
  }
  const Operand in[3] = {{p, p_dtype, p_row_stride}, {m, m_dtype, m_row_stride}, {base, base_dtype, base_row_stride}};
  const Operand to{out, out_dtype, out_row_stride};
  const bool wide = p_dtype == 3 || m_dtype == 3 || base_dtype == 3;
  const int64_t n_chunks = (n_rows + chunk_rows - 1) / chunk_rows;
  claim_chunks(n_chunks, counters, wait, [&](int64_t k) {
    const int64_t r0 = k * chunk_rows;
    const int64_t r1 = r0 + chunk_rows < n_rows ? r0 + chunk_rows : n_rows;
    if (wide) {
      task_rows<double>(in, to, r0, r1, n_cols, half_lam, StatsOut{stats, stats_dtype});
    } else {
      task_rows<float>(in, to, r0, r1, n_cols, half_lam, StatsOut{stats, stats_dtype});
    }
  });
  return 0;
}

// dst[i] = src[i] converted through the compute type (widen, then round once to dst's dtype):
// lets tests compare the kernel's conversions bit for bit with torch's.
EXTSUB_EXPORT int extsub_convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n) {
  return with_dtypes(dst_dtype, src_dtype, [&](auto dst_tag, auto src_tag) {
    using D = typename decltype(dst_tag)::type;
    using S = typename decltype(src_tag)::type;
    using C = Compute<D, S>;
    constexpr int kLanes = 128 / sizeof(C);
    const Stored<S>* from = static_cast<const Stored<S>*>(src);
    Stored<D>* to = static_cast<Stored<D>*>(dst);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {  // the vector loops' conversions
      const Loaded<S, C, kLanes> in(from + i);
      Narrowed<D, C, kLanes> out(to + i);
      for (int k = 0; k < kLanes; ++k) out.set(k, in[k]);
      out.flush();
    }
    for (; i < n; ++i) to[i] = Format<D>::narrow(static_cast<C>(Format<S>::widen(from[i])));  // the tails' conversions
  });
}

// 1 when float16 vectors convert in hardware (F16C, or the compiler's _Float16), 0 with the bit-level conversions.
EXTSUB_EXPORT int extsub_hardware_f16() {
#if defined(EXTSUB_F16C) || defined(EXTSUB_NATIVE_F16)
  return 1;
#else
  return 0;
#endif
}
