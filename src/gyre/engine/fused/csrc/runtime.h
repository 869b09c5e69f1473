// The runtime every generated translation unit of the fused backend includes first: the
// pointwise helpers (zoneout and valid mask, layer norm), the buffer pool, the matrix products
// of the time loop (oneDNN's prepacked weight, BLAS, the register-tiled kernel on a packed
// weight), the products over all T*B rows, the batch split across threads, and the streaming
// step's types and small-batch product. Generated code (codegen.py) calls these by name; what
// differs per cell is generated, nothing here is.
#pragma once
#include <Python.h>  // first, as Python asks: the streaming entry (stream_entry.h)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/sum.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>
#include <ATen/ops/from_blob.h>
#include <dlfcn.h>
#include <time.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Subnormal floats flushed to zero on this thread while it lives (MXCSR's flush-to-zero and
// denormals-are-zero bits, restored after, on throw too): every entry of the fused kernels and
// every parallel body in them holds one. A gradient that decays through a long sequence spends
// most of its steps in the subnormal range otherwise, where each multiply takes a microcode
// assist (measured: LSTM backward 10-17x slower on such series); values below the smallest
// normal number (1.2e-38 in float32) change by less than that.
struct FlushSubnormals {
#if defined(__SSE__)
  unsigned int saved;
  FlushSubnormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

// exp with its argument clamped to where the result is finite (float: ln(FLT_MAX) = 88.7228):
// under -ffast-math a division is a reciprocal estimate refined by a Newton step, which turns
// 1 / inf into NaN: sigmoid(x) for x < -88 in float32 must come out 0, not NaN
template <typename T>
inline T exp_fin(T x) {
  constexpr T hi = std::is_same<T, float>::value ? T(88.72) : T(709.78);
  return std::exp(x < hi ? x : hi);
}

// zoneout (new = m * old + (1 - m) * new) then the valid mask (invalid rows keep the old state)
template <typename T>
void post_fwd(T* nw, const T* old, const T* z, int64_t zmode, const bool* valid, int64_t B,
              int64_t S) {
  for (int64_t b = 0; b < B; ++b) {
    T* __restrict__ n = nw + b * S;
    const T* __restrict__ o = old + b * S;
    if (valid && !valid[b]) {
      std::memcpy(n, o, sizeof(T) * S);
      continue;
    }
    if (zmode == 1) {
      const T m = z[0];
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) n[j] = m * o[j] + (T(1) - m) * n[j];
    } else if (zmode == 2) {
      const T* __restrict__ zr = z + b * S;
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) n[j] = zr[j] * o[j] + (T(1) - zr[j]) * n[j];
    }
  }
}

// g = gseq + carry; splits g into the cell output's gradient gn and the carry to the old state
template <typename T>
void post_bwd(const T* gs, T* ds, T* gn, const T* z, int64_t zmode, const bool* valid,
              int64_t B, int64_t S) {
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ g = gs + b * S;
    T* __restrict__ d = ds + b * S;
    T* __restrict__ n = gn + b * S;
    if (valid && !valid[b]) {
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) { d[j] = g[j] + d[j]; n[j] = T(0); }
      continue;
    }
    if (zmode == 1) {
      const T m = z[0];
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) { T a = g[j] + d[j]; n[j] = (T(1) - m) * a; d[j] = m * a; }
    } else if (zmode == 2) {
      const T* __restrict__ zr = z + b * S;
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) {
        T a = g[j] + d[j]; n[j] = (T(1) - zr[j]) * a; d[j] = zr[j] * a;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) { n[j] = g[j] + d[j]; d[j] = T(0); }
    }
  }
}

// a row's mean and 1 / sqrt(biased variance + eps)
template <typename T>
inline void row_stats(const T* __restrict__ xr, int64_t W, double eps, T& mean, T& rstd) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < W; ++j) s += xr[j];
  mean = s / T(W);
  T v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < W; ++j) { T d = xr[j] - mean; v += d * d; }
  rstd = T(1) / std::sqrt(v / T(W) + T(eps));
}

// y = (x - mean) / sqrt(var + eps) * w + c over each row of width W; each row's mean and rstd
// to stats (2 per row) unless null
template <typename T>
void ln_fwd(const T* x, T* y, const T* w, const T* c, int64_t B, int64_t W, double eps,
            T* stats) {
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ xr = x + b * W;
    T* __restrict__ yr = y + b * W;
    T mean, rstd;
    row_stats(xr, W, eps, mean, rstd);
    if (stats) { stats[2 * b] = mean; stats[2 * b + 1] = rstd; }
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      T h = (xr[j] - mean) * rstd;
      if (w) h = h * w[j];
      if (c) h = h + c[j];
      yr[j] = h;
    }
  }
}

// the forward's row statistics from stats (as ln_fwd saved them), recomputed when null; every
// row's weight and bias gradients are added to the one row dw, dc (unless null)
template <typename T>
void ln_bwd(const T* x, const T* dy, const T* w, T* dx, T* dw, T* dc, int64_t B, int64_t W,
            double eps, const T* stats) {
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ xr = x + b * W;
    const T* __restrict__ gr = dy + b * W;
    T* __restrict__ dr = dx + b * W;
    T mean, rstd;
    if (stats) { mean = stats[2 * b]; rstd = stats[2 * b + 1]; }
    else row_stats(xr, W, eps, mean, rstd);
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = 0; j < W; ++j) {
      T h = (xr[j] - mean) * rstd;
      T gh = w ? gr[j] * w[j] : gr[j];
      s1 += gh;
      s2 += gh * h;
    }
    s1 /= T(W);
    s2 /= T(W);
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      T h = (xr[j] - mean) * rstd;
      T gh = w ? gr[j] * w[j] : gr[j];
      dr[j] = rstd * (gh - s1 - h * s2);
      if (dw) dw[j] += gr[j] * h;
      if (dc) dc[j] += gr[j];
    }
  }
}

template <typename T>
T* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; }

// Big buffers reused across calls, per thread. A training loop asks for the same tens of MB
// every step, and memory fresh from the system costs a page fault per 4 KiB on first touch
// (measured: ~15% of a small LSTM's training step, more in the median). Every tensor handed out
// is a view of a slab, so the slab is free again exactly when nothing but the pool holds its
// storage, not even a weak reference (outputs the caller keeps, tensors autograd saved, a
// gradient that became .grad stay theirs); free slabs unused for a while are dropped.
struct Slab {
  at::Tensor t;
  int64_t bytes;
  uint64_t used;
};
struct Pool {
  std::vector<Slab> slabs;
  uint64_t tick = 0;
};

bool slab_free(const Slab& s) {
  const c10::Storage& st = s.t.storage();
  // the weak count: 1 for all strong references together, 1 for this probe
  return st.use_count() == 1 && st.getWeakStorageImpl().weak_use_count() == 2 &&
         int64_t(st.nbytes()) >= s.bytes;  // (someone's storage().resize_(0))
}
constexpr int64_t kPoolMinBytes = 1 << 16;  // smaller ones come from malloc
constexpr uint64_t kPoolAge = 256;  // a free slab not chosen in this many allocations is dropped
constexpr int64_t kPoolFreeBytes = int64_t(1) << 30;  // at most this much kept in free slabs

at::Tensor pooled(at::IntArrayRef sizes, const at::TensorOptions& opts, bool zero) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const int64_t bytes = n * int64_t(opts.dtype().itemsize());
  if (bytes < kPoolMinBytes) return zero ? at::zeros(sizes, opts) : at::empty(sizes, opts);
  static thread_local Pool pool;
  const uint64_t now = ++pool.tick;
  Slab* best = nullptr;
  for (auto& s : pool.slabs)
    if (s.bytes >= bytes && s.bytes <= 2 * bytes && (!best || s.bytes < best->bytes) &&
        s.t.dtype() == opts.dtype() && slab_free(s))
      best = &s;
  if (best == nullptr) {
    pool.slabs.push_back({at::empty({n}, opts), bytes, now});
    best = &pool.slabs.back();
  }
  best->used = now;
  at::Tensor out = best->t.narrow(0, 0, n).view(sizes);
  int64_t free_bytes = 0;
  for (size_t i = pool.slabs.size(); i-- > 0;) {
    Slab& s = pool.slabs[i];
    if (!slab_free(s)) continue;
    free_bytes += s.bytes;
    if (now - s.used > kPoolAge || free_bytes > kPoolFreeBytes) {
      free_bytes -= s.bytes;
      pool.slabs.erase(pool.slabs.begin() + i);
    }
  }
  if (zero) out.zero_();
  return out;
}

}  // namespace

// oneDNN's matmul with a prepacked weight, through torch's stable C shim (faster than MKL's
// sgemm for the recurrent shapes on this CPU); at::cpu::mm_out where no packed weight is given
extern "C" int32_t aoti_torch_cpu__linear_pointwise(void* X, void* W, void** B, const char* attr,
    const double** scalars, int64_t scalars_len, const char** algorithm, void** ret0);
extern "C" int32_t aoti_torch_delete_tensor_object(void* tensor);

namespace {

// BLAS (torch's MKL) called directly where torch exports it: no tensor views or dispatch per
// step. Row-major out (B x N) = l (B x K) @ mat (K x N) is column-major out^T = mat^T l^T.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const float*, const float*, const int*, const float*, const int*,
                          const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const double*, const double*, const int*, const double*, const int*,
                          const double*, double*, const int*);

template <typename T>
void* blas_symbol() {
  static void* f = dlsym(RTLD_DEFAULT, std::is_same<T, float>::value ? "sgemm_" : "dgemm_");
  return f;
}

template <typename T>
bool blas_gemm(T* out, int64_t ldc, const T* l, int64_t ldl, const at::Tensor& mat, int64_t B) {
  void* f = blas_symbol<T>();
  const int64_t K = mat.size(0), N = mat.size(1);
  if (f == nullptr || B <= 0 || K <= 0 || N <= 0) return false;
  const int64_t s0 = mat.stride(0), s1 = mat.stride(1);
  char ta;
  int64_t lda;
  if (s1 == 1 && s0 >= std::max<int64_t>(N, 1)) { ta = 'N'; lda = s0; }
  else if (s0 == 1 && s1 >= std::max<int64_t>(K, 1)) { ta = 'T'; lda = s1; }
  else return false;
  const int m = N, n = B, k = K, ia = lda, ib = ldl, ic = ldc;
  const char tb = 'N';
  const T one = 1, zero = 0;
  const T* a = mat.data_ptr<T>();
  if constexpr (std::is_same<T, float>::value) {
    reinterpret_cast<sgemm_fn>(f)(&ta, &tb, &m, &n, &k, &one, a, &ia, l, &ib, &zero, out, &ic);
  } else {
    reinterpret_cast<dgemm_fn>(f)(&ta, &tb, &m, &n, &k, &one, a, &ia, l, &ib, &zero, out, &ic);
  }
  return true;
}

// The per-step products of a chunk's rows (a few to a few dozen rows times the weight): a
// register-tiled kernel on a weight packed once per call. Vector extensions of the native width
// (GCC lowers them to AVX-512, AVX2 or SSE); each tile holds kMR rows x 2 vectors of columns in
// registers over the whole K loop, reads the rows in place (one broadcast per element) and
// writes the tile once. Measured against MKL's packed sgemm (cblas_sgemm_compute) for the
// recurrent shapes of a 2-thread chunk, one thread: 0.60-0.80x its time (8 x 64 @ 64 x 256:
// 2.5 us vs 3.9; 16 x 512 @ 512 x 128: 18 us vs 25), as MKL packs the rows and scales the
// output on every call.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kMR = 8;
#elif defined(__AVX__)
constexpr int kVecBytes = 32, kMR = 6;
#else
constexpr int kVecBytes = 16, kMR = 4;
#endif

template <typename T>
struct Tile {
  static constexpr int L = kVecBytes / sizeof(T);  // lanes per vector
  static constexpr int NR = 2 * L;                 // columns per panel
  typedef T v __attribute__((vector_size(kVecBytes)));
  typedef T vu __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
};

// a matrix (K x N) by panels of NR columns, each panel K rows of NR (zero past N)
struct Packed {
  at::Tensor buf;  // undefined: not packed
  int64_t K = 0, N = 0;
};

template <typename T>
Packed pack(const at::Tensor& mat) {
  constexpr int NR = Tile<T>::NR;
  Packed pk;
  pk.K = mat.size(0);
  pk.N = mat.size(1);
  const int64_t np = (pk.N + NR - 1) / NR, s0 = mat.stride(0), s1 = mat.stride(1);
  pk.buf = at::zeros({np * pk.K * NR}, mat.options());
  T* out = pk.buf.data_ptr<T>();
  const T* in = mat.data_ptr<T>();
  for (int64_t j = 0; j < np; ++j) {
    const int64_t nc = std::min<int64_t>(NR, pk.N - j * NR);
    for (int64_t k = 0; k < pk.K; ++k) {
      T* o = out + (j * pk.K + k) * NR;
      const T* i = in + k * s0 + j * NR * s1;
      for (int64_t c = 0; c < nc; ++c) o[c] = i[c * s1];
    }
  }
  return pk;
}

// C (MR rows of up to NR columns: nc) = (or += with add) A @ B (+ init, NR values added to every
// row) over K: A's element (r, k) at r * lda + k (a row-major block), or with AT at k * lda + r (a
// transposed one, for a^T b); B's row k of NR columns at k * ldb (a packed panel: ldb = NR, or a
// row-major matrix, padded past nc)
template <typename T, int MR, bool AT>
inline void tile(T* __restrict__ C, int64_t ldc, const T* __restrict__ A, int64_t lda,
                 const T* __restrict__ Bm, int64_t ldb, int64_t K, int64_t nc, bool add,
                 const T* init = nullptr) {
  using V = typename Tile<T>::v;
  using VU = typename Tile<T>::vu;
  constexpr int L = Tile<T>::L;
  const V i0 = init ? *reinterpret_cast<const VU*>(init) : V{};
  const V i1 = init ? *reinterpret_cast<const VU*>(init + L) : V{};
  V acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) { acc[r][0] = i0; acc[r][1] = i1; }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = *reinterpret_cast<const VU*>(Bm + k * ldb);
    const V b1 = *reinterpret_cast<const VU*>(Bm + k * ldb + L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T a = AT ? A[k * lda + r] : A[r * lda + k];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  if (nc == 2 * L) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      VU* c0 = reinterpret_cast<VU*>(C + r * ldc);
      VU* c1 = reinterpret_cast<VU*>(C + r * ldc + L);
      if (add) { *c0 += acc[r][0]; *c1 += acc[r][1]; }
      else { *c0 = acc[r][0]; *c1 = acc[r][1]; }
    }
  } else {
    for (int r = 0; r < MR; ++r)
      for (int64_t c = 0; c < nc; ++c) {
        const T v = acc[r][c / L][c % L];
        C[r * ldc + c] = add ? C[r * ldc + c] + v : v;
      }
  }
}

// the last m < kMR rows
template <typename T, int MR, bool AT>
inline void tile_rows(int64_t m, T* C, int64_t ldc, const T* A, int64_t lda, const T* Bm,
                      int64_t ldb, int64_t K, int64_t nc, bool add, const T* init = nullptr) {
  if constexpr (MR > 1) {
    if (m < MR) return tile_rows<T, MR - 1, AT>(m, C, ldc, A, lda, Bm, ldb, K, nc, add, init);
  }
  tile<T, MR, AT>(C, ldc, A, lda, Bm, ldb, K, nc, add, init);
}

// rows [r0, r1) of C (its columns of one panel) = (or += with add) those rows of A (row-major)
// @ the panel's K rows of NR, tile by tile of kMR rows
template <typename T>
inline void panel_rows(T* C, int64_t ldc, const T* A, int64_t lda, int64_t r0, int64_t r1,
                       const T* panel, int64_t K, int64_t nc, bool add, const T* init = nullptr) {
  for (int64_t i = r0; i < r1; i += kMR)
    tile_rows<T, kMR, false>(std::min<int64_t>(kMR, r1 - i), C + i * ldc, ldc, A + i * lda, lda,
                             panel, Tile<T>::NR, K, nc, add, init);
}

// C (M x N, row stride ldc) = A (M x K, row stride lda) @ the packed matrix; panel by panel,
// so that a panel stays in L1 across the row tiles
template <typename T>
void packed_gemm(T* C, int64_t ldc, const T* A, int64_t lda, int64_t M, const Packed& pk) {
  constexpr int NR = Tile<T>::NR;
  const int64_t K = pk.K, np = (pk.N + NR - 1) / NR;
  const T* bp = pk.buf.data_ptr<T>();
  for (int64_t j = 0; j < np; ++j)
    panel_rows<T>(C + j * NR, ldc, A, lda, 0, M, bp + j * K * NR, K,
                  std::min<int64_t>(NR, pk.N - j * NR), false);
}

// c (M x N, contiguous) (+= with add) a^T @ b, a (K x M) and b (K x N) contiguous: a weight's
// gradient over all T*B rows, on the tiled kernel (matmul_tn below chooses between it and BLAS).
// The (panel, row tile) pairs are split across threads (each tile summed by one thread over all
// K: reproducible), K in blocks that keep a in L2. a and b are read
// in place (measured: copying b's panel blocks first cost 7-13% at 192-512 columns), but for the
// last panel when it is short of NR columns, which is copied to a zero-padded block. Each tile
// reads 8 values of every row of a, so a should be the narrower operand: with a 512 wide (2 KiB
// rows) on freshly written memory this ran 2x slower than with it 64 wide. Measured against
// MKL's sgemm (at::mm) at K = 3200, 2 threads, a 32-128 wide: 0.7-0.8x its time. With bsum, b's
// column sums are added to it too (a bias's gradient), by the thread with each panel's first row
// tile, summed per block of K, then across blocks.
template <typename T>
void matmul_tn_tiled(const T* a, const T* b, T* c, int64_t K, int64_t M, int64_t N, bool add,
                     T* bsum = nullptr) {
  constexpr int NR = Tile<T>::NR;
  constexpr int64_t Kc = 256;
  if (N <= 0) return;
  if (M <= 0 || K <= 0) {
    if (bsum != nullptr)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n) bsum[n] += b[k * N + n];
    if (K <= 0 && !add) std::fill(c, c + M * N, T(0));
    return;
  }
  const int64_t np = (N + NR - 1) / NR, mt = (M + kMR - 1) / kMR;
  at::parallel_for(0, np * mt, 1, [&](int64_t w0, int64_t w1) {
    FlushSubnormals flush;
    std::vector<T> panel;  // the last panel's block when it is short of NR columns
    for (int64_t k0 = 0; k0 < K; k0 += Kc) {
      const int64_t kc = std::min(Kc, K - k0);
      bool packed = false;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t j = w / mt, i = (w % mt) * kMR, nc = std::min<int64_t>(NR, N - j * NR);
        const T* bp = b + k0 * N + j * NR;
        int64_t ldb = N;
        if (nc < NR) {
          if (!packed) {
            panel.assign(kc * NR, T(0));
            for (int64_t k = 0; k < kc; ++k)
              std::memcpy(&panel[k * NR], bp + k * N, sizeof(T) * nc);
            packed = true;
          }
          bp = panel.data();
          ldb = NR;
        }
        if (bsum != nullptr && i == 0) {
          T blk[NR] = {};
          for (int64_t k = 0; k < kc; ++k)
#pragma omp simd
            for (int c = 0; c < NR; ++c) blk[c] += bp[k * ldb + c];
          for (int64_t c = 0; c < nc; ++c) bsum[j * NR + c] += blk[c];
        }
        tile_rows<T, kMR, true>(std::min<int64_t>(kMR, M - i), c + i * N + j * NR, N,
                                a + k0 * M + i, M, bp, ldb, kc, nc, add || k0 > 0);
      }
    }
  });
}

// the same product by BLAS (torch's MKL, where exported). With bsum, K in blocks, each
// block's column sums of b taken right after its product, while in cache.
template <typename T>
void matmul_tn_blas(void* f, const T* a, const T* b, T* c, int64_t K, int64_t M, int64_t N,
                    bool add, T* bsum) {
  // row-major c (M x N) = a^T b is column-major c' (N x M) = b' (N x K) a'^T, where b' and a'
  // are b and a read column-major (N x K, M x K)
  const int64_t step = bsum == nullptr ? K : 512;
  for (int64_t k0 = 0; k0 < K; k0 += step) {
    const int m = N, n = M, k = std::min(step, K - k0), lda = N, ldb = M, ldc = N;
    const char ta = 'N', tb = 'T';
    const T one = 1, beta = add || k0 > 0 ? 1 : 0;
    const T* bk = b + k0 * N;
    const T* ak = a + k0 * M;
    if constexpr (std::is_same<T, float>::value) {
      reinterpret_cast<sgemm_fn>(f)(&ta, &tb, &m, &n, &k, &one, bk, &lda, ak, &ldb, &beta, c,
                                    &ldc);
    } else {
      reinterpret_cast<dgemm_fn>(f)(&ta, &tb, &m, &n, &k, &one, bk, &lda, ak, &ldb, &beta, c,
                                    &ldc);
    }
    if (bsum != nullptr)
      for (int64_t r = 0; r < k; ++r) {
        const T* __restrict__ br = bk + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) bsum[j] += br[j];
      }
  }
}

inline double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// Whether matmul_tn runs BLAS (else the tiled kernel) for a shape: measured on the first product
// of each (dtype, K rounded up to a power of 2, M, N, threads), both kernels timed twice on it
// (the calling thread's CPU time; once each for a product of 2^30 multiply-adds or more), and
// kept for the process. Neither wins everywhere: MKL packs its panels where the tiled kernel's
// strided reads of b conflict in L1 (1.35-1.5x the tiled kernel's speed on an AVX-512 Xeon at
// a 64-256 wide), but takes its AVX2 code on other vendors' CPUs (0.4x the tiled kernel's
// speed on an AVX-512 EPYC at a 32-128 wide).
template <typename T>
bool tn_prefers_blas(void* f, const T* a, const T* b, int64_t K, int64_t M, int64_t N) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, bool> chosen;
  int64_t kb = 1;
  while (kb < K) kb *= 2;
  const auto key = std::make_tuple(kb, M, N, int64_t(at::get_num_threads()));
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = chosen.find(key);
    if (it != chosen.end()) return it->second;
  }
  std::vector<T> scratch(M * N);
  const int reps = double(K) * M * N >= double(int64_t(1) << 30) ? 1 : 2;
  double tiled = 1e300, blas = 1e300;
  for (int r = 0; r < reps; ++r) {
    double t0 = thread_seconds();
    matmul_tn_tiled<T>(a, b, scratch.data(), K, M, N, false, nullptr);
    tiled = std::min(tiled, thread_seconds() - t0);
    t0 = thread_seconds();
    matmul_tn_blas<T>(f, a, b, scratch.data(), K, M, N, false, nullptr);
    blas = std::min(blas, thread_seconds() - t0);
  }
  std::lock_guard<std::mutex> g(mu);
  return chosen.emplace(key, blas < tiled).first->second;
}

// c (M x N) (+= with add) a^T @ b over all K rows, and b's column sums added to bsum when given:
// BLAS or the tiled kernel, whichever tn_prefers_blas measured faster for the shape
template <typename T>
void matmul_tn(const T* a, const T* b, T* c, int64_t K, int64_t M, int64_t N, bool add,
               T* bsum = nullptr) {
  void* f = blas_symbol<T>();
  const int64_t lim = std::numeric_limits<int>::max();
  if (f == nullptr || N <= 0 || K <= 0 || M <= 0 || K > lim || M > lim || N > lim ||
      !tn_prefers_blas<T>(f, a, b, K, M, N))
    return matmul_tn_tiled<T>(a, b, c, K, M, N, add, bsum);
  matmul_tn_blas<T>(f, a, b, c, K, M, N, add, bsum);
}

// C (M x N, row stride ldc) = A (M x K, row stride lda) @ the packed matrix (+ bias): a product
// over all T*B rows (the input projection and its input gradient). Blocks of kMc rows split
// across threads; in each, K in blocks of kKc so that a panel's block stays in L1 across the
// block's row tiles. Measured against MKL's sgemm (at::linear / at::mm) for the input projections
// and their input gradients at the benchmark's small shapes, 2 threads: 0.95-1.1x its time
// forward, 0.80-0.85x for the input gradient.
constexpr int64_t kMc = 32, kKc = 256;

template <typename T>
void mm_rows(const T* A, int64_t lda, int64_t M, const Packed& pk, T* C, int64_t ldc,
             const T* bias) {
  constexpr int NR = Tile<T>::NR;
  const int64_t K = pk.K, N = pk.N, np = (N + NR - 1) / NR, nb = (M + kMc - 1) / kMc;
  const T* bp = pk.buf.data_ptr<T>();
  std::vector<T> biasp(bias == nullptr ? 0 : np * NR, T(0));  // padded to whole panels
  if (bias != nullptr) std::copy(bias, bias + N, biasp.begin());
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    FlushSubnormals flush;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kMc, r1 = std::min(M, r0 + kMc);
      if (K == 0)
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = 0; c < N; ++c) C[r * ldc + c] = bias == nullptr ? T(0) : bias[c];
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        const bool add = k0 > 0;
        for (int64_t j = 0; j < np; ++j) {
          const int64_t nc = std::min<int64_t>(NR, N - j * NR);
          const T* panel = bp + (j * K + k0) * NR;
          const T* init = add || bias == nullptr ? nullptr : biasp.data() + j * NR;
          panel_rows<T>(C + j * NR, ldc, A + k0, lda, r0, r1, panel, kc, nc, add, init);
        }
      }
    }
  });
}

// out (B x N, row stride ldc) = l (B x K, row stride ldl) @ mat (K x N); through oneDNN's
// prepacked weight when given, else the tiled kernel when mat was packed for it
template <typename T>
void gemm(T* out, int64_t ldc, T* l, int64_t ldl, int64_t B, const at::Tensor& mat,
          const at::Tensor* packed, const Packed* tiled = nullptr) {
  if (tiled != nullptr && tiled->buf.defined()) {
    packed_gemm<T>(out, ldc, l, ldl, B, *tiled);
    return;
  }
  if (packed != nullptr && packed->defined() && packed->numel()) {
    at::Tensor x = at::from_blob(l, {B, mat.size(0)}, {ldl, 1}, mat.options()), w = *packed;
    void* r = nullptr;
    if (aoti_torch_cpu__linear_pointwise(&x, &w, nullptr, "none", nullptr, 0, nullptr, &r) == 0
        && r != nullptr) {
      at::from_blob(out, {B, mat.size(1)}, {ldc, 1}, mat.options())
          .copy_(*static_cast<at::Tensor*>(r));
      aoti_torch_delete_tensor_object(r);
      return;
    }
  }
  if (blas_gemm<T>(out, ldc, l, ldl, mat, B)) return;
  at::Tensor o = at::from_blob(out, {B, mat.size(1)}, {ldc, 1}, mat.options());
  at::cpu::mm_out(o, at::from_blob(l, {B, mat.size(0)}, {ldl, 1}, mat.options()), mat);
}

// chunk(R0, R1) over all batch rows: split across torch's threads, one contiguous range each,
// when each gets at least kMinRows rows and the whole loop is worth it (cost: per row). The rows
// of a batch never meet in a recurrence, so the chunks need no synchronisation at all: each runs
// its own time loop with single-threaded matrix products (BLAS and oneDNN run serially inside
// a parallel region), instead of every step's product split across threads and the pointwise
// work on one.
template <typename F>
void batch_split(int64_t B, int64_t cost_per_row, const F& chunk) {
  constexpr int64_t kMinRows = 4;
  constexpr int64_t kMinCost = int64_t(1) << 20;
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t n = std::min<int64_t>(nt, B / kMinRows);
  if (n < 2 || B * cost_per_row < kMinCost) {
    chunk(0, B);
    return;
  }
  using local_fn = int (*)(int);
  static const auto set_local =
      reinterpret_cast<local_fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  struct SerialMkl {  // MKL serial on this thread while it runs a chunk (restored on throw too)
    int before;
    SerialMkl() : before(set_local ? set_local(1) : 0) {}
    ~SerialMkl() { if (set_local) set_local(before); }
  };
  at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
    SerialMkl serial;
    FlushSubnormals flush;
    for (int64_t c = c0; c < c1; ++c) chunk(B * c / n, B * (c + 1) / n);
  });
}

// a kernel over rows [b0, b1): split across torch's threads when a step has enough work
template <typename F>
void rows(int64_t B, int64_t per_row, const F& f) {
  constexpr int64_t kMin = 1 << 19;
  if (B > 1 && B * per_row >= 2 * kMin) {
    at::parallel_for(0, B, std::max<int64_t>(1, kMin / std::max<int64_t>(per_row, 1)),
                     [&](int64_t b0, int64_t b1) { FlushSubnormals flush; f(b0, b1); });
  } else {
    f(0, B);
  }
}

}  // namespace

// -- streaming: one time step, any batch, in place (stream_entry.h: the Python entry) --
namespace gyre_stream {

// scratch that grows to the largest step seen and is then reused: no allocation per call
struct Work {
  std::vector<double> buf;
  template <typename T>
  T* get(int64_t n) {
    const size_t need = (static_cast<size_t>(n) * sizeof(T) + 63) / sizeof(double) + 16;
    if (buf.size() < need) buf.resize(need);
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  }
};

struct Layer;
using StepFn = void (*)(bool dbl, const Layer& L, int64_t B, const void* xin, void* const* sin,
                        void* const* sout, Work& w);

// one layer's constant inputs: raw pointers into parameter memory (the Python plan keeps the
// tensors alive), each matrix as (N x K) rows with row stride ld (a transposed view of a
// row-major weight, the layout F.linear records)
struct Layer {
  StepFn fn = nullptr;
  int64_t units[4] = {0, 0, 0, 0};
  std::vector<const void*> vecs, mats;
  std::vector<int64_t> mat_ld;
  const void* wih = nullptr;  // folded input projection x @ wih^T + bih, else xin is xp
  int64_t wih_ld = 0;
  const void* bih = nullptr;
  int64_t in_size = 0;
  std::vector<double> zone;  // per state component: eval zoneout rate, < 0 for none
  const void* rout = nullptr;  // folded read-out h @ rout^T + rbias, else the output is h
  int64_t rout_ld = 0;
  const void* rbias = nullptr;
};

}  // namespace gyre_stream

namespace {

// up to this batch a hand-written product beats BLAS's fixed cost per call (measured at
// H=128: 1.5x faster at B=1, even at B=4, slower at B=8); BLAS above
constexpr int64_t kSmallBatch = 4;

// 32-byte vectors (GCC/Clang vector extensions, compiled for the host by -march=native): R rows
// of W at once, R = lanes, each row's partial sums in one vector, then one transposing
// reduction tree gives the R dot products in one vector (no per-row horizontal sums)
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef double v4d_u __attribute__((vector_size(32), aligned(8), may_alias));
template <typename T> struct Lanes;
template <> struct Lanes<float> {
  using V = v8f;
  using U = v8f_u;
  static constexpr int R = 8;
  static V pair(V x, V y) {
    return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15);
  }
  static V reduce(const V* a) {
    return pair(pair(pair(a[0], a[1]), pair(a[2], a[3])), pair(pair(a[4], a[5]), pair(a[6], a[7])));
  }
};
template <> struct Lanes<double> {
  using V = v4d;
  using U = v4d_u;
  static constexpr int R = 4;
  static V pair(V x, V y) {
    return __builtin_shufflevector(x, y, 0, 2, 4, 6) + __builtin_shufflevector(x, y, 1, 3, 5, 7);
  }
  static V reduce(const V* a) { return pair(pair(a[0], a[1]), pair(a[2], a[3])); }
};

// out (B x N, row stride ldo) = l (B x K, row stride ldl) @ W^T (+ bias), W (N x K) stride ldw
template <typename T>
void linear(T* out, int64_t ldo, const T* l, int64_t ldl, int64_t B, const T* W, int64_t ldw,
            int64_t K, int64_t N, const T* bias) {
  void* f = B > kSmallBatch ? blas_symbol<T>() : nullptr;
  if (f != nullptr && K > 0 && N > 0) {
    const char ta = 'T', tb = 'N';
    const int m = N, n = B, k = K, ia = ldw, ib = ldl, ic = ldo;
    const T one = 1, zero = 0;
    if constexpr (std::is_same<T, float>::value) {
      reinterpret_cast<sgemm_fn>(f)(&ta, &tb, &m, &n, &k, &one, W, &ia, l, &ib, &zero, out, &ic);
    } else {
      reinterpret_cast<dgemm_fn>(f)(&ta, &tb, &m, &n, &k, &one, W, &ia, l, &ib, &zero, out, &ic);
    }
    if (bias) {
      for (int64_t b = 0; b < B; ++b) {
        T* __restrict__ o = out + b * ldo;
#pragma omp simd
        for (int64_t n2 = 0; n2 < N; ++n2) o[n2] += bias[n2];
      }
    }
    return;
  }
  using VT = Lanes<T>;
  using V = typename VT::V;
  using U = typename VT::U;
  constexpr int R = VT::R;
  const int64_t K0 = K / R * R;
  int64_t n = 0;
  for (; n + R <= N; n += R) {
    const T* w = W + n * ldw;
    for (int64_t b = 0; b < B; ++b) {
      const T* x = l + b * ldl;
      V acc[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] = V{};
      for (int64_t k = 0; k < K0; k += R) {
        const V xv = *reinterpret_cast<const U*>(x + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] += *reinterpret_cast<const U*>(w + r * ldw + k) * xv;
      }
      const V s = VT::reduce(acc);
      T res[R];
      std::memcpy(res, &s, sizeof(res));
      for (int64_t k = K0; k < K; ++k)
        for (int r = 0; r < R; ++r) res[r] += w[r * ldw + k] * x[k];
      T* o = out + b * ldo + n;
      for (int r = 0; r < R; ++r) o[r] = bias ? res[r] + bias[n + r] : res[r];
    }
  }
  for (; n < N; ++n) {
    const T* __restrict__ w = W + n * ldw;
    for (int64_t b = 0; b < B; ++b) {
      const T* __restrict__ x = l + b * ldl;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += w[k] * x[k];
      out[b * ldo + n] = bias ? s + bias[n] : s;
    }
  }
}

// carve n elements (rounded to 64 bytes) off a scratch cursor
template <typename T>
T* carve(T*& cur, int64_t n) {
  T* p = cur;
  cur += (n * int64_t(sizeof(T)) + 63) / 64 * 64 / int64_t(sizeof(T));
  return p;
}

}  // namespace
