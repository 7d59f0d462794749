// Dense matmul: y[T, N] = x[T, K] . W[N, K]^T with float32 or bfloat16 weights.
//
// Layout and blocking. W stays in the checkpoint's [out, in] layout (no repacking, so a
// bf16 checkpoint runs straight from its memory map). Every output is a dot product
// along K, computed by a register-blocked micro-kernel over RW weight rows x RT token rows:
// RW*RT vector accumulators, RW+RT loads per K step, one horizontal sum per output.
//  - Decode (T small) is bound by reading W once: each thread streams its own slice of
//    rows, four rows at a time.
//  - Prefill (T large) is bound by FMA throughput: a panel of NB weight rows (sized to stay
//    in L2) is reused for every token block before moving on, so W is read from memory
//    once per call and x is re-read from cache.
#include <algorithm>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>  // _mm_prefetch
#endif

#include "cpu/kernels.h"
#include "cpu/quant.h"
#include "cpu/simd.h"
#include "runtime/threadpool.h"

namespace gemma {
using simd::VecF;

const char* cpu_isa() { return GEMMA_ISA_NAME; }

namespace {

constexpr int kRW = 4;  // weight rows per micro-kernel
constexpr int kRT = 4;  // token rows per micro-kernel

template <int RW, int RT, typename WT>
inline void micro_kernel(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                         float* y, int64_t ldy, bool accumulate) {
  VecF acc[RW][RT];
  for (int r = 0; r < RW; ++r)
    for (int t = 0; t < RT; ++t) acc[r][t] = VecF::zero();
  constexpr int N = VecF::N;
  const int64_t Kv = K - K % N;
  for (int64_t k = 0; k < Kv; k += N) {
    VecF xv[RT];
    for (int t = 0; t < RT; ++t) xv[t] = VecF::load(x + t * ldx + k);
    for (int r = 0; r < RW; ++r) {
#if defined(__SSE__)
      // Decode (one token, 8 rows): fetch the rows two groups on (next in memory) early.
      if (RT == 1 && RW == 8 && (k * sizeof(WT)) % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * RW) * ldw + k), _MM_HINT_T0);
#endif
      const VecF wv = VecF::load(w + r * ldw + k);
      for (int t = 0; t < RT; ++t) acc[r][t] = simd::fma(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < RW; ++r) {
    for (int t = 0; t < RT; ++t) {
      float s = simd::hsum(acc[r][t]);
      for (int64_t k = Kv; k < K; ++k) s += load_scalar(w + r * ldw + k) * x[t * ldx + k];
      float* out = y + t * ldy + r;
      *out = accumulate ? *out + s : s;
    }
  }
}

// Dispatch the (rw, rt) remainder shapes to their instantiations.
template <typename WT, int RW>
inline void micro_rt(int rt, const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                     float* y, int64_t ldy, bool acc) {
  switch (rt) {
    case 4: micro_kernel<RW, 4>(w, ldw, x, ldx, K, y, ldy, acc); break;
    case 3: micro_kernel<RW, 3>(w, ldw, x, ldx, K, y, ldy, acc); break;
    case 2: micro_kernel<RW, 2>(w, ldw, x, ldx, K, y, ldy, acc); break;
    default: micro_kernel<RW, 1>(w, ldw, x, ldx, K, y, ldy, acc); break;
  }
}

template <typename WT>
inline void micro(int rw, int rt, const WT* w, int64_t ldw, const float* x, int64_t ldx,
                  int64_t K, float* y, int64_t ldy, bool acc) {
  switch (rw) {
    case 4: micro_rt<WT, 4>(rt, w, ldw, x, ldx, K, y, ldy, acc); break;
    case 3: micro_rt<WT, 3>(rt, w, ldw, x, ldx, K, y, ldy, acc); break;
    case 2: micro_rt<WT, 2>(rt, w, ldw, x, ldx, K, y, ldy, acc); break;
    default: micro_rt<WT, 1>(rt, w, ldw, x, ldx, K, y, ldy, acc); break;
  }
}

// Rows [n_begin, n_end) of y for all T tokens, on the calling thread.
template <typename WT>
void matmul_rows(const float* x, int64_t T, int64_t ldx, const WT* w, int64_t K, int64_t ldw,
                 float* y, int64_t ldy, bool accumulate, int64_t n_begin, int64_t n_end) {
  if (T == 1) {
    // One token (decode): eight weight rows at a time, eight memory streams per core.
    int64_t n = n_begin;
    for (; n + 8 <= n_end; n += 8) micro_kernel<8, 1>(w + n * ldw, ldw, x, ldx, K, y + n, ldy, accumulate);
    for (; n < n_end; ++n) micro_kernel<1, 1>(w + n * ldw, ldw, x, ldx, K, y + n, ldy, accumulate);
    return;
  }
  // Panel of weight rows kept in L2 (~256 KiB) while all token blocks pass over it.
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(WT));
  int64_t NB = std::max<int64_t>(kRW, (256 * 1024 / std::max<int64_t>(row_bytes, 1)) / kRW * kRW);
  NB = std::min<int64_t>(NB, 64);
  for (int64_t nb = n_begin; nb < n_end; nb += NB) {
    const int64_t nb_end = std::min(n_end, nb + NB);
    for (int64_t t = 0; t < T; t += kRT) {
      const int rt = static_cast<int>(std::min<int64_t>(kRT, T - t));
      for (int64_t n = nb; n < nb_end; n += kRW) {
        const int rw = static_cast<int>(std::min<int64_t>(kRW, nb_end - n));
        micro<WT>(rw, rt, w + n * ldw, ldw, x + t * ldx, ldx, K, y + t * ldy + n, ldy, accumulate);
      }
    }
  }
}

template <typename WT>
void matmul_typed(const float* x, int64_t T, int64_t ldx, const Weight& wt, float* y,
                  int64_t ldy, bool accumulate) {
  const WT* w = static_cast<const WT*>(wt.data);
  const int64_t N = wt.rows;
  parallel_for((N + kRW - 1) / kRW, [&](int64_t c0, int64_t c1) {
    matmul_rows<WT>(x, T, ldx, w, wt.cols, wt.ld, y, ldy, accumulate, c0 * kRW, std::min(N, c1 * kRW));
  });
}

}  // namespace

void matmul_serial(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy) {
  if (w.dtype == DType::F32)
    matmul_rows<float>(x, T, ldx, static_cast<const float*>(w.data), w.cols, w.ld, y, ldy, false, 0, w.rows);
  else
    matmul_rows<uint16_t>(x, T, ldx, static_cast<const uint16_t*>(w.data), w.cols, w.ld, y, ldy, false, 0, w.rows);
}

void matmul_generic_bf16(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y,
                         int64_t ldy, bool accumulate) {
  matmul_typed<uint16_t>(x, T, ldx, w, y, ldy, accumulate);
}

void matmul(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
            bool accumulate, Work work) {
  if (T <= 0 || w.rows <= 0) return;
  if (w.dtype == DType::F32)
    matmul_typed<float>(x, T, ldx, w, y, ldy, accumulate);  // one kernel for any work
  else if (w.dtype == DType::BF16)
    matmul_bf16(x, T, ldx, w, y, ldy, accumulate, work);
  else
    matmul_quant(x, T, ldx, w, y, ldy, accumulate, work);
}

void matmul_many(const float* x, int64_t T, int64_t ldx, const MatmulTarget* outs, int n, Work work) {
  if (matmul_quant_many(x, T, ldx, outs, n, work)) return;
  for (int i = 0; i < n; ++i) matmul(x, T, ldx, *outs[i].w, outs[i].y, outs[i].ldy, outs[i].accumulate, work);
}

void weight_row(const Weight& w, int64_t r, float* out) {
  if (w.kquant()) {
    thread_local std::vector<uint8_t> row;
    row.resize(static_cast<size_t>(w.ld));
    gather_row(QMatrix{static_cast<const uint8_t*>(w.data), nullptr, nullptr, w.rows, w.ld, 0}, r, row.data(), nullptr,
               nullptr);
    dequantize_row_kquant(w.dtype, row.data(), w.cols, out);
  } else if (w.quantized()) {
    const int64_t nb = w.cols / kQBlock;
    const DType f = w.dtype;
    // The row in plain order first (quant.h interleaves rows in groups of 16).
    thread_local std::vector<uint8_t> q;
    thread_local std::vector<uint16_t> dm;
    q.resize(static_cast<size_t>(w.ld));
    dm.resize(static_cast<size_t>(2 * nb));
    gather_row(QMatrix{static_cast<const uint8_t*>(w.data), w.scales, w.mins, w.rows, w.ld, nb}, r, q.data(),
               dm.data(), dm.data() + nb);
    dequantize_row(f, q.data(), dm.data(), w.mins ? dm.data() + nb : nullptr, w.cols, out);
  } else if (w.dtype == DType::F32) {
    std::memcpy(out, static_cast<const float*>(w.data) + r * w.ld, w.cols * sizeof(float));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w.data) + r * w.ld;
    for (int64_t k = 0; k < w.cols; ++k) out[k] = bf16_to_f32(p[k]);
  }
}

}  // namespace gemma
