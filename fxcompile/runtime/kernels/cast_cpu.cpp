// Fused fixed-point cast kernels for CPU: one pass over memory, forward and backward.
//
// Each kernel replays quantize_reference (fxcompile/runtime/cast.py) operation by operation in the
// same work precision, so results are equal bit for bit; -ffp-contract=off keeps the
// compiler from fusing those steps.  Stochastic rounding draws u from a counter-based hash
// of (seed, logical element index), which the pure-PyTorch reference reproduces.
//
// The forward also writes the saturation mask packed one bit per element (int64 words),
// which is all the backward needs: 1/32 of a float32 activation instead of a saved output.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <sys/mman.h>
#include <type_traits>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace {

enum Rounding { NEAREST = 0, STOCHASTIC = 1, FLOOR = 2, TOWARD_ZERO = 3 };
enum Overflow { SATURATE = 0, WRAP = 1, WRAP_POW2 = 2 };  // WRAP_POW2: internal fast path
constexpr int64_t WORD = 64;              // elements per mask word; also the block size
constexpr int64_t GRAIN_WORDS = 32768 / WORD;

struct Spec {
  int64_t frac = 0, qmin = 0, qmax = 0, zp = 0, rounding = 0, overflow = 0;
  static Spec of(at::IntArrayRef s, const char* what) {
    TORCH_CHECK(s.size() == 6, "fxcompile: ", what, " spec must be [frac, code_min, code_max, zero_point, "
                "rounding, overflow] (6 ints), got ", s.size(), " ints");
    TORCH_CHECK(s[4] >= 0 && s[4] <= 3 && s[5] >= 0 && s[5] <= 1, "fxcompile: ", what,
                " spec has an unknown rounding or overflow index: ", s);
    return Spec{s[0], s[1], s[2], s[3], s[4], s[5]};
  }
  // float32 holds every integer exactly up to 2**24; wrapping adds offsets up to twice the
  // code range to a code, so wrapping formats wider than 22 bits work in float64.
  bool needs_double() const { return qmax - qmin >= (int64_t(1) << (overflow == WRAP ? 22 : 24)); }
};

template <typename W>
struct Params {
  W scale, inv_scale, zp, qmin, qmax, range, inv_range;
  uint32_t s0, s1;
  Params(const Spec& s, uint64_t seed)
      : scale(static_cast<W>(std::ldexp(1.0, static_cast<int>(s.frac)))),
        inv_scale(static_cast<W>(std::ldexp(1.0, static_cast<int>(-s.frac)))),
        zp(static_cast<W>(s.zp)), qmin(static_cast<W>(s.qmin)), qmax(static_cast<W>(s.qmax)),
        range(static_cast<W>(s.qmax - s.qmin + 1)), inv_range(W(1) / range),
        s0(static_cast<uint32_t>(seed)), s1(static_cast<uint32_t>(seed >> 32)) {}
};

// lowbias32 (C. Wellons): a bijective 32-bit mixer; two rounds key it by seed and index.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

template <typename W>
inline W uniform(uint32_t h);
template <>
inline float uniform<float>(uint32_t h) { return static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f; }
template <>
inline double uniform<double>(uint32_t h) { return static_cast<double>(h) * 0x1p-32; }

// torch.remainder for floats: fmod, then shift into the divisor's sign.
template <typename W>
inline W remainder(W a, W b) {
  W m = std::fmod(a, b);
  return (m != W(0) && ((b < W(0)) != (m < W(0)))) ? m + b : m;
}

// x * 2**frac -> rounded, offset, saturated or wrapped code (still a float of type W).
// For integer-valued t and a power-of-two divisor every step here is exact, so this equals
// torch.remainder up to the sign of a zero result, which the following "+ code_min" erases.
template <typename W>
inline W remainder_pow2(W a, W b, W inv_b) {
  return a - b * std::floor(a * inv_b);
}

template <typename W, int R, int O, bool ZP>
inline W to_code(W t, W u, const Params<W>& p) {
  if (R == NEAREST) {
    t = std::nearbyint(t);  // ties to even in the default rounding mode, like torch.round
  } else if (R == FLOOR) {
    t = std::floor(t);
  } else if (R == TOWARD_ZERO) {
    t = std::trunc(t);
  } else {
    W f = std::floor(t);
    t = f + (u < t - f ? W(1) : W(0));
  }
  if (O == WRAP) t = remainder(t, p.range);
  if (O == WRAP_POW2) t = remainder_pow2(t, p.range, p.inv_range);
  if (ZP) t = t + p.zp;
  if (O == SATURATE) {
    t = std::min(std::max(t, p.qmin), p.qmax);
  } else if (O == WRAP) {
    t = remainder(t - p.qmin, p.range) + p.qmin;
  } else {
    t = remainder_pow2(t - p.qmin, p.range, p.inv_range) + p.qmin;
  }
  if (ZP) t = t - p.zp;
  return t;
}

// One block of at most 64 elements starting at global index `start`.
// With a mask (backward), x is an incoming gradient, zeroed where `zero_bits` has a bit; Q rounds.
template <typename T, typename W, int R, int O, bool ZP, bool Q>
inline void block(const T* __restrict__ x, T* __restrict__ y, int64_t start, int64_t len, const Params<W>& p,
                  uint64_t zero_bits) {
  // __restrict__ drops the runtime overlap check that would send in-place calls (x == y) to
  // the scalar loop; element j is read before it is written, so in place is safe.
  const uint32_t lo = static_cast<uint32_t>(start);
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(start) >> 32) ^ p.s1;
  W u[WORD];
  if (R == STOCHASTIC) {
    for (int32_t j = 0; j < static_cast<int32_t>(WORD); ++j) {
      u[j] = uniform<W>(mix32(mix32((lo + static_cast<uint32_t>(j)) ^ p.s0) + hi));
    }
  }
  for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
    W xv = static_cast<W>(x[j]);
    if (zero_bits) xv = ((zero_bits >> j) & 1) ? W(0) : xv;
    if (Q) {
      W t = to_code<W, R, O, ZP>(xv * p.scale, R == STOCHASTIC ? u[j] : W(0), p);
      y[j] = static_cast<T>(t * p.inv_scale + W(0) * xv);  // 0 * +-Inf = NaN: non-finite stays so
    } else {
      y[j] = static_cast<T>(xv);
    }
  }
}

template <typename T>
inline uint64_t saturated_bits_scalar(const T* y, int64_t len, T lo, T hi) {
  uint64_t bits = 0;
  for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
    const bool inside = (y[j] > lo) & (y[j] < hi);  // no short circuit: keeps the loop vectorisable
    bits |= static_cast<uint64_t>(!inside) << j;
  }
  return bits;
}

// Compilers do not vectorise bit packing; compare-to-mask instructions do it directly.
// Lanes<T>: how many elements one compare covers (N, 0 without a vector form), and the bits
// of those outside (lo, hi) -- NaN included, as in the scalar loop.
template <typename T>
struct Lanes {
  static constexpr int N = 0;
  static uint64_t outside(const T*, T, T) { return 0; }
};

#if defined(__AVX512F__)
#define FXC_LANES_AVX512(T, VEC, SFX, LANES, BITS)                                              \
  template <>                                                                                   \
  struct Lanes<T> {                                                                             \
    static constexpr int N = LANES;                                                             \
    static uint64_t outside(const T* y, T lo, T hi) {                                           \
      const VEC v = _mm512_loadu_##SFX(y);                                                      \
      return static_cast<BITS>(~(_mm512_cmp_##SFX##_mask(v, _mm512_set1_##SFX(lo), _CMP_GT_OQ) & \
                                 _mm512_cmp_##SFX##_mask(v, _mm512_set1_##SFX(hi), _CMP_LT_OQ))); \
    }                                                                                           \
  };
FXC_LANES_AVX512(float, __m512, ps, 16, uint16_t)
FXC_LANES_AVX512(double, __m512d, pd, 8, uint8_t)
#undef FXC_LANES_AVX512
#elif defined(__AVX2__)
template <>
struct Lanes<float> {
  static constexpr int N = 8;
  static uint64_t outside(const float* y, float lo, float hi) {
    const __m256 v = _mm256_loadu_ps(y);
    const __m256 in = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(lo), _CMP_GT_OQ),
                                    _mm256_cmp_ps(v, _mm256_set1_ps(hi), _CMP_LT_OQ));
    return static_cast<uint64_t>(~_mm256_movemask_ps(in) & 0xFF);
  }
};
#endif

template <typename T>
inline uint64_t saturated_bits(const T* y, int64_t len, T lo, T hi) {
  if constexpr (Lanes<T>::N > 0) {
    if (len == WORD) {
      uint64_t bits = 0;
      for (int k = 0; k < WORD; k += Lanes<T>::N) bits |= Lanes<T>::outside(y + k, lo, hi) << k;
      return bits;
    }
  }
  return saturated_bits_scalar(y, len, lo, hi);
}

// y = round(mask ? 0 : x); optionally writes the saturation bits of y into `mask_out`.
template <typename T, typename W, int R, int O, bool ZP, bool Q>
void run(const T* x, T* y, int64_t n, const Spec& s, uint64_t seed, const int64_t* mask_in, int64_t* mask_out) {
  Params<W> p(s, seed);
  T lo{}, hi{};
  if (mask_out) {
    // the same comparison as the reference: bounds in the value's own dtype
    lo = static_cast<T>(static_cast<double>(s.qmin - s.zp) * std::ldexp(1.0, static_cast<int>(-s.frac)));
    hi = static_cast<T>(static_cast<double>(s.qmax - s.zp) * std::ldexp(1.0, static_cast<int>(-s.frac)));
  }
  const int64_t words = (n + WORD - 1) / WORD;
  at::parallel_for(0, words, GRAIN_WORDS, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t start = w * WORD, len = std::min(WORD, n - start);
      const uint64_t zero = mask_in ? static_cast<uint64_t>(mask_in[w]) : 0;
      block<T, W, R, O, ZP, Q>(x + start, y + start, start, len, p, zero);
      if (mask_out) mask_out[w] = static_cast<int64_t>(saturated_bits<T>(y + start, len, lo, hi));
    }
  });
}

template <typename T, typename W>
void dispatch_modes(const T* x, T* y, int64_t n, const Spec* s, uint64_t seed, const int64_t* mask_in,
                    int64_t* mask_out) {
  if (!s) return run<T, W, NEAREST, SATURATE, false, false>(x, y, n, Spec{}, seed, mask_in, nullptr);
  const bool zp = s->zp != 0;
  const uint64_t range = static_cast<uint64_t>(s->qmax - s->qmin + 1);
  const int64_t overflow = s->overflow == WRAP && (range & (range - 1)) == 0 ? WRAP_POW2 : s->overflow;
#define FXC_CASE(R, O)                                                                  \
  if (s->rounding == R && overflow == O) {                                           \
    if (zp) return run<T, W, R, O, true, true>(x, y, n, *s, seed, mask_in, mask_out);   \
    return run<T, W, R, O, false, true>(x, y, n, *s, seed, mask_in, mask_out);          \
  }
  FXC_CASE(NEAREST, SATURATE) FXC_CASE(NEAREST, WRAP) FXC_CASE(NEAREST, WRAP_POW2)
  FXC_CASE(STOCHASTIC, SATURATE) FXC_CASE(STOCHASTIC, WRAP) FXC_CASE(STOCHASTIC, WRAP_POW2)
  FXC_CASE(FLOOR, SATURATE) FXC_CASE(FLOOR, WRAP) FXC_CASE(FLOOR, WRAP_POW2)
  FXC_CASE(TOWARD_ZERO, SATURATE) FXC_CASE(TOWARD_ZERO, WRAP) FXC_CASE(TOWARD_ZERO, WRAP_POW2)
#undef FXC_CASE
}

// The kernel entry: x -> y (same dtype), contiguous; mask words in/out optional.
void launch(const at::Tensor& x, const at::Tensor& y, const Spec* s, uint64_t seed, const int64_t* mask_in,
            int64_t* mask_out) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const bool wide = x.scalar_type() == at::kDouble || (s && s->needs_double());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxcompile_cast", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (wide) {
      dispatch_modes<scalar_t, double>(xp, yp, n, s, seed, mask_in, mask_out);
    } else {
      dispatch_modes<scalar_t, float>(xp, yp, n, s, seed, mask_in, mask_out);
    }
  });
}

// ---- "is x already in the format?": lets parameter casts skip the rounded copy -------------------

template <typename T>
inline auto bits_of(T v) {
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U u;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

// Any rounding mode leaves a value of the format unchanged and moves every other value, so
// round-to-nearest decides for all of them; the comparison is bit for bit (signed zeros too).
template <typename T, typename W, int O, bool ZP>
bool fixed_run(const T* x, int64_t n, const Spec& s) {
  const Params<W> p(s, 0);
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + WORD - 1) / WORD, GRAIN_WORDS, [&](int64_t w0, int64_t w1) {
    T tmp[WORD];
    for (int64_t w = w0; w < w1 && ok.load(std::memory_order_relaxed); ++w) {
      const int64_t start = w * WORD, len = std::min(WORD, n - start);
      block<T, W, NEAREST, O, ZP, true>(x + start, tmp, start, len, p, 0);
      bool same = true;
      for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) same &= bits_of(tmp[j]) == bits_of(x[start + j]);
      if (!same) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

template <typename T, typename W>
bool fixed_modes(const T* x, int64_t n, const Spec& s) {
  const uint64_t range = static_cast<uint64_t>(s.qmax - s.qmin + 1);
  const int64_t o = s.overflow == WRAP && (range & (range - 1)) == 0 ? WRAP_POW2 : s.overflow;
  const bool zp = s.zp != 0;
#define FXC_FIXED(O) \
  if (o == O) return zp ? fixed_run<T, W, O, true>(x, n, s) : fixed_run<T, W, O, false>(x, n, s);
  FXC_FIXED(SATURATE) FXC_FIXED(WRAP) FXC_FIXED(WRAP_POW2)
#undef FXC_FIXED
  return false;
}

// A plain dense CPU tensor (not a fake, functional or other wrapper seen while tracing).
bool plain_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !at::functionalization::impl::isFunctionalTensor(t) && t.key_set().has(c10::DispatchKey::CPU);
}

// ---- parameters known to sit on their grid --------------------------------------------------
//
// A parameter cast passes a parameter through when every element is already on its grid,
// which costs a read of the whole parameter every step.  The in-place quantize_ (the
// fixed-point optimizer's store) and a successful check record the tensor, its version
// counter, data pointer, size and grid here; while all of them are unchanged, the check is
// skipped.  Every in-place PyTorch op bumps the version counter, so a parameter changed
// after the store is checked again; only writes that bypass the counter (through `p.data`
// or a NumPy view) are not seen.

using ImplPtr = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct GridRecord {
  ImplPtr impl;  // a weak reference: the address cannot be reused by another tensor meanwhile
  int64_t version, numel;
  const void* data;
  std::array<int64_t, 4> grid;  // frac, code_min, code_max, zero_point: the rounding mode does not matter
};

struct GridRegistry {
  std::mutex m;
  std::unordered_map<const c10::TensorImpl*, GridRecord> records;
  static GridRegistry& get() {
    static GridRegistry* registry = new GridRegistry();
    return *registry;
  }
};

std::array<int64_t, 4> grid_of(at::IntArrayRef spec) { return {spec[0], spec[1], spec[2], spec[3]}; }

bool trackable(const at::Tensor& x) {
  return plain_cpu(x) && x.is_contiguous() && !x.is_inference() && x.is_floating_point();
}

void remember_on_grid(const at::Tensor& x, at::IntArrayRef spec) {
  if (spec.size() != 6 || !trackable(x)) return;
  GridRegistry& r = GridRegistry::get();
  std::lock_guard<std::mutex> lock(r.m);
  if (r.records.size() >= 4096) {
    for (auto it = r.records.begin(); it != r.records.end();) it = it->second.impl.expired() ? r.records.erase(it) : ++it;
  }
  r.records.insert_or_assign(x.unsafeGetTensorImpl(),
                             GridRecord{ImplPtr(x.getIntrusivePtr()), static_cast<int64_t>(x._version()), x.numel(),
                                        x.const_data_ptr(), grid_of(spec)});
}

bool known_on_grid(const at::Tensor& x, at::IntArrayRef spec) {
  if (spec.size() != 6 || !trackable(x)) return false;
  GridRegistry& r = GridRegistry::get();
  std::lock_guard<std::mutex> lock(r.m);
  auto it = r.records.find(x.unsafeGetTensorImpl());
  if (it == r.records.end()) return false;
  const GridRecord& g = it->second;
  return !g.impl.expired() && g.version == static_cast<int64_t>(x._version()) && g.numel == x.numel() &&
         g.data == x.const_data_ptr() && g.grid == grid_of(spec);
}

bool already_fixed(const at::Tensor& x, at::IntArrayRef spec) {
  if (spec.empty() || !plain_cpu(x) || !x.is_contiguous() || !x.is_floating_point()) return false;
  if (known_on_grid(x, spec)) return true;
  const Spec s = Spec::of(spec, "forward");
  const bool wide = x.scalar_type() == at::kDouble || s.needs_double();
  bool result = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxcompile_is_fixed", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    result = wide ? fixed_modes<scalar_t, double>(xp, x.numel(), s) : fixed_modes<scalar_t, float>(xp, x.numel(), s);
  });
  if (result) remember_on_grid(x, spec);
  return result;
}

// ---- output buffers: a small cache of freed blocks, reused by size --------------------------
//
// A training step frees and reallocates the same activation-sized buffers every step.
// glibc's malloc returns such memory to the kernel when much of its heap top is free and
// then pays a page fault per 4 KiB when it grows again, which on a small CNN costs as much
// as the casts' arithmetic.  The kernels' outputs therefore come from this allocator, which
// keeps freed blocks (up to `limit` bytes) and hands them back for the next request of the
// same size; small blocks go straight to PyTorch's CPU allocator.  Tensors built on it are
// ordinary resizable CPU tensors.

struct BufferCache final : public c10::Allocator {
  static constexpr size_t kMinBytes = 64 << 10;  // smaller blocks are cheap for malloc itself
  std::mutex m;
  std::unordered_map<void*, size_t> block_size;                 // every block this cache made
  std::unordered_map<size_t, std::vector<void*>> free_blocks;   // blocks waiting for reuse
  size_t cached = 0, limit = size_t(1) << 30;
  int64_t reused = 0, allocated = 0;

  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();  // never destroyed: blocks may be freed at exit
    return *cache;
  }

  static size_t round(size_t n) { return (n + 4095) & ~size_t(4095); }

  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = round(n);
    {
      std::lock_guard<std::mutex> lock(m);
      auto it = free_blocks.find(size);
      if (it != free_blocks.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached -= size;
        ++reused;
        return {p, p, &release, cpu};
      }
    }
    void* p = map(size);
    std::lock_guard<std::mutex> lock(m);
    block_size[p] = size;
    ++allocated;
    return {p, p, &release, cpu};
  }

  static void release(void* p) {
    BufferCache& c = get();
    std::unique_lock<std::mutex> lock(c.m);
    const size_t size = c.block_size.at(p);
    if (c.cached + size <= c.limit) {
      c.free_blocks[size].push_back(p);
      c.cached += size;
      return;
    }
    c.block_size.erase(p);
    lock.unlock();
    munmap(p, size);
  }

  // Blocks come straight from the kernel, not from malloc's heap, so the blocks this cache
  // holds never change where malloc's heap top lies (nor when it trims it).
  static void* map(size_t size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "fxcompile: could not allocate ", size, " bytes for a cast output");
    return p;
  }

  // Frees cached blocks until at most `keep` bytes stay cached.
  void trim(size_t keep) {
    std::vector<std::pair<void*, size_t>> out;
    {
      std::lock_guard<std::mutex> lock(m);
      for (auto& [size, blocks] : free_blocks) {
        while (cached > keep && !blocks.empty()) {
          out.emplace_back(blocks.back(), size);
          block_size.erase(blocks.back());
          blocks.pop_back();
          cached -= size;
        }
      }
    }
    for (auto [p, size] : out) munmap(p, size);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const { default_copy_data(dest, src, count); }
};

// An uninitialised contiguous CPU tensor like `like` (with `dtype`), from the buffer cache.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::Tensor& like, std::optional<at::ScalarType> dtype = {}) {
  const at::ScalarType st = dtype.value_or(like.scalar_type());
  if (!plain_cpu(like)) return at::empty(sizes, like.options().dtype(st));
  return at::detail::empty_generic(sizes, &BufferCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), st,
                                   c10::MemoryFormat::Contiguous);
}

std::vector<int64_t> buffer_cache_cpu(int64_t limit) {
  BufferCache& c = BufferCache::get();
  if (limit >= 0) {
    { std::lock_guard<std::mutex> lock(c.m); c.limit = static_cast<size_t>(limit); }
    c.trim(static_cast<size_t>(limit));
  }
  std::lock_guard<std::mutex> lock(c.m);
  return {static_cast<int64_t>(c.cached), static_cast<int64_t>(c.limit), c.reused, c.allocated};
}

// Same draw as fxcompile.runtime.kernels.draw_seed() in Python, from the default generator.
uint64_t seed_or_draw(std::optional<int64_t> seed) {
  if (seed.has_value()) return static_cast<uint64_t>(*seed);
  return static_cast<uint64_t>(at::randint(0, int64_t(1) << 62, {}, at::TensorOptions().dtype(at::kLong)).item<int64_t>());
}

bool is_stochastic(at::IntArrayRef spec) { return spec.size() == 6 && spec[4] == STOCHASTIC; }

// The tensor the kernel reads: x when contiguous, else a copy of x in the output buffer `out`
// (the kernel then runs in place, so a strided input costs no temporary).
at::Tensor source(const at::Tensor& x, const at::Tensor& out) {
  if (x.is_contiguous()) return x;
  out.copy_(x);
  return out;
}

at::Tensor quantize_cpu(const at::Tensor& x, at::IntArrayRef spec, std::optional<int64_t> seed) {
  if (spec.empty()) return x.clone();
  TORCH_CHECK(x.is_floating_point(), "fxcompile.quantize: expected a floating-point tensor, got ", x.scalar_type());
  const Spec s = Spec::of(spec, "forward");
  const uint64_t sd = is_stochastic(spec) ? seed_or_draw(seed) : 0;
  at::Tensor y = cached_empty(x.sizes(), x);
  launch(source(x, y), y, &s, sd, nullptr, nullptr);
  return y;
}

// In place: one pass, no allocation for a contiguous x (fixed-point parameter storage).
at::Tensor& quantize_inplace_cpu(at::Tensor& x, at::IntArrayRef spec, std::optional<int64_t> seed) {
  if (spec.empty()) return x;
  TORCH_CHECK(x.is_floating_point(), "fxcompile.quantize_: expected a floating-point tensor, got ", x.scalar_type());
  const Spec s = Spec::of(spec, "forward");
  const uint64_t sd = is_stochastic(spec) ? seed_or_draw(seed) : 0;
  if (x.is_contiguous()) {
    launch(x, x, &s, sd, nullptr, nullptr);
    // an in-place write: bump the version counter as PyTorch's in-place ops do (autograd
    // then refuses a tensor changed after it was saved), then record the grid
    if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
    remember_on_grid(x, spec);
  } else {
    at::Tensor y = x.contiguous();
    launch(y, y, &s, sd, nullptr, nullptr);
    x.copy_(y);
  }
  return x;
}

std::tuple<at::Tensor, at::Tensor> quantize_mask_cpu(const at::Tensor& x, at::IntArrayRef spec,
                                                     std::optional<int64_t> seed) {
  TORCH_CHECK(x.is_floating_point(), "fxcompile.quantize_mask: expected a floating-point tensor, got ",
              x.scalar_type());
  const Spec s = Spec::of(spec, "forward");
  const uint64_t sd = is_stochastic(spec) ? seed_or_draw(seed) : 0;
  at::Tensor y = cached_empty(x.sizes(), x);
  at::Tensor mask = cached_empty({(x.numel() + WORD - 1) / WORD}, x, at::kLong);
  launch(source(x, y), y, &s, sd, nullptr, mask.mutable_data_ptr<int64_t>());
  return {y, mask};
}

// Writes the cast's gradient into `out` (which may be `grad` itself).
void cast_backward_into(const at::Tensor& grad, const std::optional<at::Tensor>& mask, at::IntArrayRef spec,
                        std::optional<int64_t> seed, const at::Tensor& out) {
  TORCH_CHECK(grad.is_floating_point(), "fxcompile.cast_backward: expected a floating-point gradient");
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->scalar_type() == at::kLong && mask->is_contiguous() &&
                mask->numel() == (grad.numel() + WORD - 1) / WORD,
                "fxcompile.cast_backward: mask must hold ceil(numel / 64) int64 words");
  }
  std::optional<Spec> s;
  if (!spec.empty()) s = Spec::of(spec, "backward");
  const uint64_t sd = is_stochastic(spec) ? seed_or_draw(seed) : 0;
  launch(source(grad, out), out, s ? &*s : nullptr, sd, has_mask ? mask->const_data_ptr<int64_t>() : nullptr,
         nullptr);
}

at::Tensor cast_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& mask, at::IntArrayRef spec,
                             std::optional<int64_t> seed) {
  at::Tensor out = cached_empty(grad.sizes(), grad);
  cast_backward_into(grad, mask, spec, seed, out);
  return out;
}

// True when the autograd engine handed us the only reference to a plain CPU gradient buffer:
// `grads` (our copy) and the engine's list hold it, nothing else does (no other consumer,
// hook, view or saved tensor), so the backward may overwrite it instead of allocating.
bool owned_buffer(const at::Tensor& g) {
  return g.use_count() <= 2 && g.storage().use_count() == 1 && g.is_contiguous() && !g.requires_grad() &&
         !g.is_inference() && plain_cpu(g);
}

// ---- autograd: one C++ node per cast, no Python on the hot path --------------------------------

std::vector<int64_t> to_vec(const c10::IValue& v) { return v.toIntVector(); }

struct CastFunction : public torch::autograd::Function<CastFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef fwd,
                            at::IntArrayRef bwd, bool clip, bool parameter) {
    static auto qmask = c10::Dispatcher::singleton()
        .findSchemaOrThrow("fxcompile::quantize_mask", "").typed<decltype(quantize_mask_cpu)>();
    static auto quant = c10::Dispatcher::singleton()
        .findSchemaOrThrow("fxcompile::quantize", "").typed<decltype(quantize_cpu)>();
    ctx->saved_data["bwd"] = bwd.vec();
    const bool use_mask = clip && !fwd.empty() && fwd[5] == SATURATE;
    ctx->saved_data["clip"] = use_mask;
    if (fwd.empty() || (parameter && !use_mask && already_fixed(x, fwd))) return x.view_as(x);
    if (!use_mask) return quant.call(x, fwd, std::nullopt);
    auto [y, mask] = qmask.call(x, fwd, std::nullopt);
    ctx->save_for_backward({mask});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto bwd_op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("fxcompile::cast_backward", "").typed<decltype(cast_backward_cpu)>();
    std::vector<int64_t> bwd = to_vec(ctx->saved_data["bwd"]);
    const bool clip = ctx->saved_data["clip"].toBool();
    const at::Tensor& g = grads[0];
    if (!clip && bwd.empty()) return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    std::optional<at::Tensor> mask;
    if (clip) mask = ctx->get_saved_variables()[0];
    if (owned_buffer(g)) {
      cast_backward_into(g, mask, bwd, std::nullopt, g);
      return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    return {bwd_op.call(g, mask, bwd, std::nullopt), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor cast_composite(const at::Tensor& x, at::IntArrayRef fwd, at::IntArrayRef bwd, bool clip, bool parameter) {
  if (fwd.empty() && bwd.empty()) return x;
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    static auto quant = c10::Dispatcher::singleton()
        .findSchemaOrThrow("fxcompile::quantize", "").typed<decltype(quantize_cpu)>();
    return fwd.empty() || (parameter && already_fixed(x, fwd)) ? x : quant.call(x, fwd, std::nullopt);
  }
  return CastFunction::apply(x, fwd, bwd, clip, parameter);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxcompile, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_", &quantize_inplace_cpu);
  m.impl("quantize_mask", &quantize_mask_cpu);
  m.impl("cast_backward", &cast_backward_cpu);
}

TORCH_LIBRARY_IMPL(fxcompile, CompositeImplicitAutograd, m) { m.impl("cast", &cast_composite); }

TORCH_LIBRARY_IMPL(fxcompile, CompositeExplicitAutograd, m) { m.impl("buffer_cache", &buffer_cache_cpu); }
