// Element-wise and row-wise CPU ops: RMSNorm, GeGLU, RoPE, exp, dot, attention P.V.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "runtime/threadpool.h"

namespace gemma {
using simd::VecF;

namespace {

constexpr int64_t kElemChunk = 4096;  // elements per parallel task in element-wise ops

}  // namespace

// Applies f (VecF -> VecF) to n floats in place. The tail goes through the same vector code
// via a padded copy, so an element's result depends only on its value, never on where it
// sits in the buffer: a row gives the same numbers alone and inside a batch.
template <typename Fn>
inline void map_inplace(float* x, int64_t n, Fn f) {
  constexpr int N = VecF::N;
  int64_t i = 0;
  for (; i + N <= n; i += N) f(VecF::load(x + i)).store(x + i);
  if (i < n) {
    float tmp[N] = {};
    std::memcpy(tmp, x + i, (n - i) * sizeof(float));
    f(VecF::load(tmp)).store(tmp);
    std::memcpy(x + i, tmp, (n - i) * sizeof(float));
  }
}

void exp_inplace(float* x, int64_t n) { map_inplace(x, n, [](VecF v) { return simd::exp(v); }); }

void bf16_to_f32_array(const uint16_t* src, float* dst, int64_t n) {
  constexpr int64_t kChunk = 1 << 16;
  parallel_for((n + kChunk - 1) / kChunk, [&](int64_t c0, int64_t c1) {
    const int64_t lo = c0 * kChunk, hi = std::min(n, c1 * kChunk);
    constexpr int N = VecF::N;
    int64_t i = lo;
    for (; i + N <= hi; i += N) VecF::load_bf16(src + i).store(dst + i);
    for (; i < hi; ++i) dst[i] = bf16_to_f32(src[i]);
  });
}

float dot(const float* a, const float* b, int64_t n) {
  constexpr int N = VecF::N;
  VecF acc0 = VecF::zero(), acc1 = VecF::zero();
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    acc0 = simd::fma(VecF::load(a + i), VecF::load(b + i), acc0);
    acc1 = simd::fma(VecF::load(a + i + N), VecF::load(b + i + N), acc1);
  }
  for (; i + N <= n; i += N) acc0 = simd::fma(VecF::load(a + i), VecF::load(b + i), acc0);
  float s = simd::hsum(simd::add(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

namespace {
template <typename VT>
void weighted_rows_typed(const float* p, const VT* v, int64_t ldv, int64_t n, int64_t dim, float scale, float* out) {
  constexpr int N = VecF::N, kAcc = 8;  // 8 vectors of accumulators: 128 floats (AVX-512)
  const VecF sv = VecF::set1(scale);
  int64_t d = 0;
  for (; d + kAcc * N <= dim; d += kAcc * N) {
    VecF acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = VecF::zero();
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0.f) continue;  // a masked key: its slot may hold anything (never read)
      const VecF pj = VecF::set1(p[j]);
      const VT* vr = v + j * ldv + d;
      for (int i = 0; i < kAcc; ++i) acc[i] = simd::fma(pj, VecF::load(vr + i * N), acc[i]);
    }
    for (int i = 0; i < kAcc; ++i) simd::mul(acc[i], sv).store(out + d + i * N);
  }
  for (; d + N <= dim; d += N) {
    VecF acc = VecF::zero();
    for (int64_t j = 0; j < n; ++j)
      if (p[j] != 0.f) acc = simd::fma(VecF::set1(p[j]), VecF::load(v + j * ldv + d), acc);
    simd::mul(acc, sv).store(out + d);
  }
  for (; d < dim; ++d) {
    float acc = 0;
    for (int64_t j = 0; j < n; ++j)
      if (p[j] != 0.f) acc += p[j] * load_scalar(v + j * ldv + d);
    out[d] = acc * scale;
  }
}
}  // namespace

void weighted_rows(const float* p, const Weight& v, int64_t n, float scale, float* out) {
  if (v.dtype == DType::F32)
    weighted_rows_typed(p, static_cast<const float*>(v.data), v.ld, n, v.cols, scale, out);
  else
    weighted_rows_typed(p, static_cast<const uint16_t*>(v.data), v.ld, n, v.cols, scale, out);
}

void rmsnorm(const float* x, const float* scale, float* out, int64_t T, int64_t H, float eps) {
  auto row = [&](int64_t t) {
    const float* xr = x + t * H;
    float* o = out + t * H;
    const float ms = dot(xr, xr, H) / static_cast<float>(H);
    const float inv = 1.0f / std::sqrt(ms + eps);
    if (!scale) {
      for (int64_t i = 0; i < H; ++i) o[i] = xr[i] * inv;
      return;
    }
    for (int64_t i = 0; i < H; ++i) o[i] = (xr[i] * inv) * scale[i];
  };
  if (T * H < 65536) {
    for (int64_t t = 0; t < T; ++t) row(t);
  } else {
    parallel_for(T, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) row(t);
    });
  }
}

// gelu_tanh(a) = 0.5 a (1 + tanh(u)) = a / (1 + exp(-2u)),  u = sqrt(2/pi) (a + 0.044715 a^3)
void gelu_tanh_mul(float* a, const float* b, int64_t n) {
  const VecF c1 = VecF::set1(-2.0f * 0.7978845608028654f);
  const VecF c3 = VecF::set1(-2.0f * 0.7978845608028654f * 0.044715f);
  const VecF one = VecF::set1(1.0f);
  auto gelu = [&](VecF x) {
    const VecF z = simd::mul(x, simd::fma(c3, simd::mul(x, x), c1));  // -2u
    return simd::div(x, simd::add(one, simd::exp(z)));
  };
  auto body = [&](int64_t lo, int64_t hi) {
    map_inplace(a + lo, hi - lo, gelu);
    constexpr int N = VecF::N;
    int64_t i = lo;
    for (; i + N <= hi; i += N) simd::mul(VecF::load(a + i), VecF::load(b + i)).store(a + i);
    for (; i < hi; ++i) a[i] *= b[i];
  };
  if (n < 2 * kElemChunk) {
    body(0, n);
    return;
  }
  const int64_t chunks = (n + kElemChunk - 1) / kElemChunk;
  parallel_for(chunks, [&](int64_t c0, int64_t c1) {
    body(c0 * kElemChunk, std::min(n, c1 * kElemChunk));
  });
}

void rope_apply(float* x, int n_heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* v = x + static_cast<int64_t>(h) * head_dim;
    for (int i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * cos[i] - x2 * sin[i];
      v[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

namespace {
// The probe's buffer, on 2 MiB pages where the OS grants them (Linux transparent huge pages
// in "madvise" mode), as numpy allocates the large weight arrays: a bound measured on 4 KiB
// pages, with a page walk every 4 KiB, would be lower than what the weights can stream at.
struct ProbeBuffer {
  float* p = nullptr;
  size_t bytes = 0;
  bool mapped = false;
  explicit ProbeBuffer(int64_t n) : bytes(static_cast<size_t>(n) * sizeof(float)) {
#if defined(__unix__) || defined(__APPLE__)
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m != MAP_FAILED) {
#ifdef MADV_HUGEPAGE
      madvise(m, bytes, MADV_HUGEPAGE);  // advice only
#endif
      p = static_cast<float*>(m);
      mapped = true;
      return;
    }
#endif
    p = new float[static_cast<size_t>(n)];
  }
  ~ProbeBuffer() {
#if defined(__unix__) || defined(__APPLE__)
    if (mapped) {
      munmap(p, bytes);
      return;
    }
#endif
    delete[] p;
  }
  ProbeBuffer(const ProbeBuffer&) = delete;
  ProbeBuffer& operator=(const ProbeBuffer&) = delete;
};
}  // namespace

double read_bandwidth(int64_t bytes, int reps) {
  // Each task reads kStreams regions of the buffer side by side, as a matmul reads several
  // weight rows at once: one sequential stream per core underuses the memory system.
  constexpr int kStreams = 8;
  constexpr int64_t kChunk = 1 << 14;  // floats per stream per task (64 KiB)
  const int64_t n = std::max<int64_t>(bytes / 4, kStreams * kChunk) / (kStreams * kChunk) * (kStreams * kChunk);
  ProbeBuffer mem(n);
  float* buf = mem.p;
  std::fill(buf, buf + n, 1.0f);
  const int64_t tasks = n / (kStreams * kChunk), stride = n / kStreams;
  std::vector<float> sink(static_cast<size_t>(tasks));
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(tasks, [&](int64_t c0, int64_t c1) {
      constexpr int N = VecF::N;
      for (int64_t c = c0; c < c1; ++c) {
        VecF acc[kStreams];
        for (int s = 0; s < kStreams; ++s) acc[s] = VecF::zero();
        for (int64_t i = 0; i < kChunk; i += N)
          for (int s = 0; s < kStreams; ++s)
            acc[s] = simd::add(acc[s], VecF::load(&buf[s * stride + c * kChunk + i]));
        for (int s = 1; s < kStreams; ++s) acc[0] = simd::add(acc[0], acc[s]);
        sink[c] = simd::hsum(acc[0]);
      }
    });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n) * 4 / dt);
  }
  volatile float keep = sink[0];
  (void)keep;
  return best;
}

}  // namespace gemma
