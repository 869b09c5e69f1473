"""C++ for a traced :class:`~gyre.engine.fused.ir.Program`: the time loop forward, and the
backward through time with the reverse-mode derivative of every atom written out.

Per step, forward: kernel 0, the boundaries of stage 1 (a matrix product into preallocated
buffers, or a row-wise layer norm), kernel 1, ..., then zoneout and the valid mask. Each kernel
is one loop over rows ``b`` and a vectorizable (``omp simd``) loop over units ``j``. With several
threads the batch is cut into one row range per thread, each running the whole time loop
(``batch_split``); its products use a weight packed once per call (a register-tiled kernel,
``packed_gemm``, or oneDNN's prepacked weight for big products). The weight gradients after the
loop are single products over all ``T*B`` rows (``matmul_tn``). Every module also exports those
products over all rows as ops (:data:`PRODUCTS`: ``mm_rows``, ``mm_tn``) for the input
projection.

Backward, per step from the last: the zoneout/valid backward gives the gradient of the cell's
new state; then kernels and boundaries in reverse, each kernel recomputing its forward atoms
from saved boundary outputs and then accumulating adjoints; one GEMM per matrix product per
step for the gradient of its left operand. The matrices' gradients are single GEMMs over all
``T*B`` rows after the loop.

Streaming, one step at any batch (``step_<tag>``): the forward's kernels on scratch that is
reused across calls, the matrix products (and the input projection, when it is a plain linear
map) by a hand-written vectorized product for small batches, BLAS above. Its Python entry
(:data:`STREAM_MODULE`) runs a whole stack of layers per call; see
:mod:`gyre.engine.fused.stream`.
"""

from __future__ import annotations

from collections import defaultdict

from .ir import Atom, Program, Unsupported

# forward expressions: {0}, {1} operands, {e} the op's scalar parameter
_FWD = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "rsub": "{1} - {0}", "mul": "{0} * {1}",
    "div": "{0} / {1}", "neg": "-{0}",
    "sigmoid": "T(1) / (T(1) + exp_fin(-{0}))",
    "tanh": "std::tanh({0})",
    "relu": "({0} > T(0) ? {0} : T(0))",
    "exp": "exp_fin({0})", "log": "std::log({0})", "sqrt": "std::sqrt({0})",
    "rsqrt": "T(1) / std::sqrt({0})", "reciprocal": "T(1) / {0}",
    "silu": "{0} / (T(1) + exp_fin(-{0}))",
    "abs": "std::abs({0})",
    "maximum": "({0} > {1} ? {0} : {1})", "minimum": "({0} < {1} ? {0} : {1})",
    "pow": "std::pow({0}, T({e}))",
}
# adjoint contributions per operand: {g} output adjoint, {z} output value
_BWD = {
    "add": ["{g}", "{g}"], "sub": ["{g}", "-{g}"], "rsub": ["-{g}", "{g}"],
    "mul": ["{g} * {1}", "{g} * {0}"], "div": ["{g} / {1}", "-{g} * {z} / {1}"],
    "neg": ["-{g}"],
    "sigmoid": ["{g} * {z} * (T(1) - {z})"],
    "tanh": ["{g} * (T(1) - {z} * {z})"],
    "relu": ["({0} > T(0) ? {g} : T(0))"],
    "exp": ["{g} * {z}"], "log": ["{g} / {0}"], "sqrt": ["{g} * T(0.5) / {z}"],
    "rsqrt": ["T(-0.5) * {g} * {z} * {z} * {z}"], "reciprocal": ["-{g} * {z} * {z}"],
    "silu": ["{g} * (T(1) / (T(1) + exp_fin(-{0}))) * (T(1) + {0} * (T(1) - T(1) / "
             "(T(1) + exp_fin(-{0}))))"],
    "abs": ["({0} > T(0) ? {g} : ({0} < T(0) ? -{g} : T(0)))"],
    "maximum": ["({0} > {1} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))",
                "({1} > {0} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))"],
    "minimum": ["({0} < {1} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))",
                "({1} < {0} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))"],
    "pow": ["{g} * T({e}) * std::pow({0}, T({e}) - T(1))"],
}

PRELUDE = r"""
#include <Python.h>  // first, as Python asks: the streaming entry (STREAM_MODULE)
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
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// exp with its argument clamped to where the result is finite (float: ln(FLT_MAX) = 88.7228):
// under -ffast-math a division is a reciprocal estimate refined by a Newton step, which turns
// 1 / inf into NaN, so sigmoid(x) for x < -88 came out NaN in float32 instead of 0
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

// the forward's row statistics from stats (as ln_fwd saved them), recomputed when null
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
      if (dw) dw[b * W + j] += gr[j] * h;
      if (dc) dc[b * W + j] += gr[j];
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
constexpr int64_t kPoolMinBytes = 1 << 16;  // smaller ones come from malloc, as before
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
// gradient over all T*B rows. The (panel, row tile) pairs are split across threads (each tile
// summed by one thread over all K: reproducible), K in blocks that keep a in L2. a and b are read
// in place (measured: copying b's panel blocks first cost 7-13% at 192-512 columns), but for the
// last panel when it is short of NR columns, which is copied to a zero-padded block. Each tile
// reads 8 values of every row of a, so a should be the narrower operand: with a 512 wide (2 KiB
// rows) on freshly written memory this ran 2x slower than with it 64 wide. Measured against
// MKL's sgemm (at::mm) at K = 3200, 2 threads, a 32-128 wide: 0.7-0.8x its time. With bsum, b's
// column sums are added to it too (a bias's gradient), by the thread with each panel's first row
// tile, summed per block of K, then across blocks.
template <typename T>
void matmul_tn(const T* a, const T* b, T* c, int64_t K, int64_t M, int64_t N, bool add,
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
    for (int64_t c = c0; c < c1; ++c) chunk(B * c / n, B * (c + 1) / n);
  });
}

// a kernel over rows [b0, b1): split across torch's threads when a step has enough work
template <typename F>
void rows(int64_t B, int64_t per_row, const F& f) {
  constexpr int64_t kMin = 1 << 19;
  if (B > 1 && B * per_row >= 2 * kMin) {
    at::parallel_for(0, B, std::max<int64_t>(1, kMin / std::max<int64_t>(per_row, 1)), f);
  } else {
    f(0, B);
  }
}

}  // namespace

// -- streaming: one time step, any batch, in place (see STREAM_MODULE for the Python entry) --
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
"""


def _lit(v: float) -> str:
    if v != v:
        return "std::numeric_limits<T>::quiet_NaN()"
    if v in (float("inf"), float("-inf")):
        return ("" if v > 0 else "-") + "std::numeric_limits<T>::infinity()"
    return f"T({v!r})"


class _Gen:
    def __init__(self, prog: Program, tag: str):
        self.p = prog
        self.tag = tag
        self.S = prog.nstages
        atoms = prog.atoms
        users: dict[int, set[int]] = defaultdict(set)  # atom -> stages of kernels needing it
        for a in atoms:
            if a.op not in ("xp", "state", "drop", "vec", "bout", "const"):
                for x in a.args:
                    users[x].add(a.stage)
        for b in prog.boundaries:
            for x in b.inputs:
                users[x].add(b.stage - 1)
        for comp in prog.outputs:
            for x in comp:
                a = atoms[x]
                if not a.row or a.fam < 0:
                    raise Unsupported("a new state that does not depend on the batch row")
        self.cross: dict[int, int] = {}
        self.ncross: dict[tuple[int, int], int] = defaultdict(int)
        for i, a in enumerate(atoms):
            if a.stage >= 1 and a.op not in ("bout", "const") and users[i] and \
                    max(users[i]) > a.stage:
                key = (a.stage, a.fam)
                self.cross[i] = self.ncross[key]
                self.ncross[key] += 1
        self.bin_alias = self._bin_aliases()
        # buffer slots
        self.slots: dict[tuple, int] = {}
        for name in (("xp",), ("drop",)):
            self.slot(name)
        for k in range(len(prog.states)):
            self.slot(("state", k))
            self.slot(("new", k))
        for i in range(len(prog.vecs)):
            self.slot(("vec", i))
        for bi in range(len(prog.boundaries)):
            self.slot(("bout", bi))
            self.slot(("bin", bi))
        for key in sorted(self.ncross):
            self.slot(("cross", *key))
        self.nfwd = len(self.slots)
        self.slot(("dxp",))
        for k in range(len(prog.states)):
            self.slot(("dstate", k))
            self.slot(("gn", k))
        for i in range(len(prog.vecs)):
            self.slot(("dvec", i))
        for bi in range(len(prog.boundaries)):
            self.slot(("dbout", bi))
            self.slot(("dbin", bi))
        for key in sorted(self.ncross):
            self.slot(("dcross", *key))

    def _bin_aliases(self) -> dict[int, tuple]:
        """Layer norms that read their input where it already is: every block, in order, of the
        input pre-activations (``("xp",)``) or of an earlier boundary's output (``("bout", bj)``),
        those atoms used nowhere else. No kernel copies them into the boundary's input buffer,
        nothing extra is saved, and the layer norm's backward writes their gradient itself."""
        p = self.p
        uses: dict[int, int] = defaultdict(int)
        for a in p.atoms:
            if a.op not in ("xp", "state", "drop", "vec", "bout", "const"):
                for x in a.args:
                    uses[x] += 1
        for b in p.boundaries:
            for x in b.inputs:
                uses[x] += 1
        for comp in p.outputs:
            for x in comp:
                uses[x] += 1
        out = {}
        for bi, b in enumerate(p.boundaries):
            if b.kind != "ln" or any(uses[x] != 1 for x in b.inputs):
                continue
            srcs = {(p.atoms[x].op, p.atoms[x].args[0] if p.atoms[x].op == "bout" else None)
                    for x in b.inputs}
            if len(srcs) != 1:
                continue
            op, bj = srcs.pop()
            if op == "xp":
                key, fam, blocks = ("xp",), p.xp[0], p.xp[1]
            elif op == "bout":
                src = p.boundaries[bj]
                key, fam, blocks = ("bout", bj), src.out_fam, src.out_blocks
            else:
                continue
            if (fam, blocks) == (b.in_fam, len(b.inputs)) and \
                    [p.atoms[x].args[1] for x in b.inputs] == list(range(blocks)):
                out[bi] = key
        return out

    @staticmethod
    def _grad_key(src: tuple) -> tuple:
        """The gradient buffer of an alias source (``("xp",)`` or ``("bout", bj)``)."""
        return ("dxp",) if src == ("xp",) else ("dbout", src[1])

    def _alias_ptrs(self, grad: bool) -> list[str]:
        """Point aliased boundary inputs (and, with ``grad``, their gradients) at their source."""
        L = []
        for bi, key in self.bin_alias.items():
            src = self.slots[key]
            L.append(f"    P[{self.slots[('bin', bi)]}] = P[{src}]; "
                     f"LD[{self.slots[('bin', bi)]}] = LD[{src}];")
            if grad:
                dsrc = self.slots[self._grad_key(key)]
                L.append(f"    P[{self.slots[('dbin', bi)]}] = P[{dsrc}]; "
                         f"LD[{self.slots[('dbin', bi)]}] = LD[{dsrc}];")
        return L

    def slot(self, key) -> int:
        if key not in self.slots:
            self.slots[key] = len(self.slots)
        return self.slots[key]

    # -- widths (C++ expressions of the runtime units U[f]) ------------------------------------
    @staticmethod
    def width(fam: int, blocks: int) -> str:
        return f"({blocks} * U[{fam}])"

    def roots(self, s: int, f: int):
        """What kernel (s, f) materializes: [(atom, kind, index, position)]."""
        p, out = self.p, []
        for k, comp in enumerate(p.outputs):
            for blk, a in enumerate(comp):
                if p.atoms[a].stage == s and p.atoms[a].fam == f:
                    out.append((a, "new", k, blk))
        for bi, b in enumerate(p.boundaries):
            if b.stage - 1 == s and b.in_fam == f and bi not in self.bin_alias:
                for pos, a in enumerate(b.inputs):
                    out.append((a, "bin", bi, pos))
        for a, slot in self.cross.items():
            at = p.atoms[a]
            if at.stage == s and at.fam == f:
                out.append((a, "cross", (at.stage, at.fam), slot))
        return out

    def closure(self, s: int, roots) -> tuple[list[int], list[int]]:
        """Atoms evaluated in kernel s: (computed in topological order, terminals)."""
        seen, comp, term = set(), set(), set()
        stack = [r[0] for r in roots]
        while stack:
            a = stack.pop()
            if a in seen:
                continue
            seen.add(a)
            at = self.p.atoms[a]
            if at.op in ("xp", "state", "drop", "vec", "bout", "const"):
                term.add(a)
            elif a in self.cross and at.stage < s:
                term.add(a)
            else:
                comp.add(a)
                stack.extend(at.args)
        return sorted(comp), sorted(term)

    def load(self, a: int, s: int) -> tuple[str, str | None]:
        """(value expression, row-pointer slot name) of a terminal atom in kernel s."""
        at = self.p.atoms[a]
        if at.op == "const":
            return _lit(at.args[0]), None
        if at.op in ("xp", "drop"):
            return f"p{self.slots[(at.op,)]}[{at.args[1]} * U_ + j]", (at.op,)
        if at.op == "state":
            key = ("state", at.args[0])
        elif at.op == "vec":
            key = ("vec", at.args[0])
        elif at.op == "bout":
            key = ("bout", at.args[0])
        else:  # cross
            key = ("cross", at.stage, at.fam)
            return f"p{self.slots[key]}[{self.cross[a]} * U_ + j]", key
        return f"p{self.slots[key]}[{at.args[1]} * U_ + j]", key

    def grad_target(self, a: int) -> tuple | None:
        at = self.p.atoms[a]
        if at.op == "const" or at.op == "drop":
            return None
        if at.op == "xp":
            return ("dxp",), at.args[1]
        if at.op in ("state", "vec", "bout"):
            return ("d" + at.op, at.args[0]), at.args[1]
        return ("dcross", at.stage, at.fam), self.cross[a]

    def expr(self, a: int) -> str:
        at = self.p.atoms[a]
        args = [f"v{x}" for x in at.args]
        e = at.extra[0] if at.extra else 0
        return _FWD[at.op].format(*args, e=repr(float(e)))

    def kernel(self, s: int, f: int, backward: bool) -> str | None:
        roots = self.roots(s, f)
        if not roots:
            return None
        comp, term = self.closure(s, roots)
        used: set = set()
        body: list[str] = []
        for a in term:
            val, key = self.load(a, s)
            if key is not None:
                used.add(key)
            body.append(f"const T v{a} = {val};")
        for a in comp:
            body.append(f"const T v{a} = {self.expr(a)};")
        if not backward:
            for a, kind, idx, pos in roots:
                key = (kind, idx) if kind != "cross" else ("cross", *idx)
                used.add(key)
                body.append(f"p{self.slots[key]}[{pos} * U_ + j] = v{a};")
        else:
            every = term + comp
            for a in every:
                if self.p.atoms[a].op != "const":
                    body.append(f"T g{a} = T(0);")
            for a, kind, idx, pos in roots:
                key = {"new": ("gn", idx), "bin": ("dbin", idx)}.get(kind)
                if key is None:
                    key = ("dcross", *idx)
                used.add(key)
                body.append(f"g{a} += p{self.slots[key]}[{pos} * U_ + j];")
            for a in reversed(comp):
                at = self.p.atoms[a]
                e = at.extra[0] if at.extra else 0
                vals = [f"v{x}" for x in at.args]
                for x, tmpl in zip(at.args, _BWD[at.op], strict=False):
                    if self.p.atoms[x].op == "const":
                        continue
                    body.append(f"g{x} += {tmpl.format(*vals, g=f'g{a}', z=f'v{a}', e=repr(float(e)))};")
            for a in term:
                tgt = self.grad_target(a)
                if tgt is None:
                    continue
                key, pos = tgt
                if (key == ("dxp",) and self.dxp_alias is not None) or \
                        (key[0] == "dvec" and key[1] in self.vec_alias):
                    continue  # the same values are written to (or summed from) another buffer
                used.add(key)
                first = self.first_writer.get((key, pos)) == (s, f)
                body.append(f"p{self.slots[key]}[{pos} * U_ + j] {'=' if first else '+='} g{a};")
        name = f"k{'b' if backward else 'f'}_{self.tag}_s{s}_f{f}"
        ptrs = [f"    T* __restrict__ p{self.slots[key]} = P[{self.slots[key]}] + b * "
                f"LD[{self.slots[key]}];" for key in sorted(used, key=lambda k: self.slots[k])]
        lines = [
            "template <typename T>",
            f"static void {name}(int64_t b0, int64_t b1, int64_t U_, T* const* P, "
            "const int64_t* LD) {",
            "  for (int64_t b = b0; b < b1; ++b) {",
            *ptrs,
            "#pragma omp simd",
            "    for (int64_t j = 0; j < U_; ++j) {",
            *("      " + x for x in body),
            "    }",
            "  }",
            "}",
        ]
        self.work[(backward, s, f)] = len(comp) + len(term)
        return name, "\n".join(lines)

    # -- drivers -------------------------------------------------------------------------------
    def _call(self, kernels, backward: bool, s: int, f: int) -> str:
        name = kernels[(backward, s, f)]
        work = self.work[(backward, s, f)]
        return (f"    rows(NB, {work} * U[{f}], [&](int64_t b0, int64_t b1) {{ "
                f"{name}<T>(b0, b1, U[{f}], P, LD); }});")

    def _first_writers(self) -> None:
        """Which backward kernel writes each gradient block of dxp/dbout first (it assigns
        instead of accumulating, so those buffers need no zeroing)."""
        self.first_writer = {}
        self.writers = defaultdict(int)
        for s in reversed(range(self.S)):
            for f in range(self.p.nfam):
                roots = self.roots(s, f)
                if not roots:
                    continue
                _, term = self.closure(s, roots)
                for a in term:
                    tgt = self.grad_target(a)
                    if tgt is None or tgt[0][0] not in ("dxp", "dbout"):
                        continue
                    self.writers[tgt] += 1
                    self.first_writer.setdefault(tgt, (s, f))

    def _lns(self) -> list[int]:
        return [bi for bi, b in enumerate(self.p.boundaries) if b.kind == "ln"]

    def _canonical(self, s: int, f: int) -> dict[int, int]:
        """For kernel (s, f)'s terminals: the atom whose adjoint equals theirs. An atom whose one
        use is as a term of a sum passes its adjoint on unchanged (``g_a = g_c``), so e.g. the
        input pre-activation, the product's output and a bias added to them all have the
        adjoint of their sum."""
        roots = self.roots(s, f)
        comp, term = self.closure(s, roots)
        uses: dict[int, list[int]] = defaultdict(list)
        for c in comp:
            for x in self.p.atoms[c].args:
                uses[x].append(c)
        rootset = {r[0] for r in roots}
        out = {}
        for a in term:
            c = a
            while c not in rootset and len(uses[c]) == 1:
                u = self.p.atoms[uses[c][0]]
                if not (u.op == "add" or (u.op == "sub" and u.args[0] == c)):
                    break
                c = uses[c][0]
            out[a] = c
        return out

    def _aliases(self) -> None:
        """Gradient buffers that would hold the same values: ``dxp`` equal to a product's
        ``dbout`` block by block (written once, returned as both), and a vector's gradient that
        is the column sum of such a buffer (one sum after the loop instead of a per-row
        accumulation every step)."""
        p = self.p
        found: dict = {}  # (key, pos) -> (kernel, canonical atom), for single-writer targets
        for s in range(self.S):
            for f in range(p.nfam):
                if not self.roots(s, f):
                    continue
                canon = self._canonical(s, f)
                for a, c in canon.items():
                    tgt = self.grad_target(a)
                    if tgt is None:
                        continue
                    found.setdefault(tgt, []).append(((s, f), c))

        def same(k1, k2, blocks: int) -> bool:
            return all(len(found.get((k1, i), [])) == 1 and found.get((k2, i)) == found[(k1, i)]
                       for i in range(blocks))

        self.dxp_alias = None  # bi: dxp is dbout{bi}
        xp_w = self.width(*p.xp)
        for bi, b in enumerate(p.boundaries):
            if b.kind == "mm" and self.width(b.out_fam, b.out_blocks) == xp_w and \
                    same(("dxp",), ("dbout", bi), p.xp[1]):
                self.dxp_alias = bi
                break
        self.vec_alias: dict[int, tuple] = {}  # vec -> the gradient buffer it sums
        for v, (fam, blocks) in enumerate(p.vecs):
            cands = [(("dxp",), p.xp)] + [(("dbout", bi), (b.out_fam, b.out_blocks))
                                          for bi, b in enumerate(p.boundaries)]
            for key, (bf, bb) in cands:
                if (bf, bb) == (fam, blocks) and same(("dvec", v), key, blocks):
                    self.vec_alias[v] = key
                    break

    def _step_dbouts(self) -> set[int]:
        """Layer norms whose output gradient nothing reads after its own step (no column sum):
        one block of rows reused every step instead of a buffer over all steps."""
        summed = set(self.vec_alias.values())
        return {bi for bi, b in enumerate(self.p.boundaries)
                if b.kind == "ln" and ("dbout", bi) not in summed}

    def _needs_zero(self, key, blocks: int) -> bool:
        if any(key == self._grad_key(src) for src in self.bin_alias.values()):
            return False  # written whole by that layer norm's backward
        return any(self.writers[(key, pos)] == 0 for pos in range(blocks))

    def source(self) -> str:
        p = self.p
        self._first_writers()
        self._aliases()
        self.work = {}
        kernels = {}
        parts = []
        for backward in (False, True):
            for s in range(self.S):
                for f in range(p.nfam):
                    k = self.kernel(s, f, backward)
                    if k is not None:
                        kernels[(backward, s, f)] = k[0]
                        parts.append(k[1])
        parts.append(self.fwd_driver(kernels))
        parts.append(self.bwd_driver(kernels))
        parts.append(self.step_driver(kernels))
        return "\n\n".join(parts)

    def _common(self) -> list[str]:
        p = self.p
        L = [
            "  const int64_t T_ = xp.size(0), B = xp.size(1);",
            f"  int64_t U[{max(p.nfam, 1)}];",
            f"  for (int64_t f = 0; f < {p.nfam}; ++f) U[f] = units[f];",
            "  auto opts = xp.options();",
            f"  const int64_t W_xp = {self.width(*p.xp)};",
        ]
        for k, st in enumerate(p.states):
            L.append(f"  const int64_t S{k} = {self.width(*st)};")
        for bi, b in enumerate(p.boundaries):
            L.append(f"  const int64_t WI{bi} = {self.width(b.in_fam, len(b.inputs))};")
            L.append(f"  const int64_t WO{bi} = {self.width(b.out_fam, b.out_blocks)};")
        for (s, f), n in sorted(self.ncross.items()):
            L.append(f"  const int64_t WC{s}_{f} = {self.width(f, n)};")
        L += [
            f"  T* P0[{len(self.slots)}] = {{}};",
            f"  int64_t LD0[{len(self.slots)}] = {{}};",
            f"  P0[{self.slots[('drop',)]}] = ptr<T>(drop); LD0[{self.slots[('drop',)]}] = "
            f"drop.size(1);",
            "  const bool* vptr = valid.numel() ? valid.data_ptr<bool>() : nullptr;",
        ]
        for i in range(len(p.vecs)):
            L.append(f"  P0[{self.slots[('vec', i)]}] = ptr<T>(vecs[{i}]);")
        return L

    def _row_cost(self) -> str:
        """Work per batch row per time step (multiply-adds of its products plus the kernels'
        op counts), as C++ over the drivers' width names: what ``batch_split`` weighs."""
        terms = [f"WI{bi} * WO{bi}" for bi, b in enumerate(self.p.boundaries) if b.kind == "mm"]
        terms += [f"{w} * U[{f}]" for (bwd, s, f), w in sorted(self.work.items()) if not bwd]
        return "(" + " + ".join(terms or ["1"]) + ")"

    def _chunk_open(self, mats: str) -> list[str]:
        """Start of the time loop's body over batch rows [R0, R1): the rows of a batch never
        meet in a recurrence, so each chunk runs the whole loop on its own (one per thread,
        see ``batch_split``) with its own pointer arrays, the shared ones moved to row R0."""
        n = len(self.slots)
        return [
            "  std::vector<Packed> tiled;  // the tiled kernel's weights, shared by the chunks",
            f"  if (packed.empty()) for (const auto& m : {mats}) tiled.push_back(pack<T>(m));",
            f"  else tiled.resize({mats}.size());",
            "  auto chunk = [&](int64_t R0, int64_t R1) {",
            "  const int64_t NB = R1 - R0;",
            f"  T* P[{n}];",
            f"  int64_t LD[{n}];",
            f"  for (int i = 0; i < {n}; ++i) {{ LD[i] = LD0[i]; P[i] = P0[i] ? P0[i] + R0 * LD0[i] "
            ": nullptr; }",
        ]

    def _step_ptrs(self, saved_t: str) -> list[str]:
        p, sl = self.p, self.slots
        L = [f"    P[{sl[('xp',)]}] = xp_p + (t * B + R0) * W_xp; LD[{sl[('xp',)]}] = W_xp;"]
        for k in range(len(p.states)):
            L.append(f"    P[{sl[('state', k)]}] = (t == 0 ? ptr<T>(state0[{k}]) : "
                     f"seq{k}_p + (t - 1) * B * S{k}) + R0 * S{k}; LD[{sl[('state', k)]}] = S{k};")
            L.append(f"    P[{sl[('new', k)]}] = seq{k}_p + (t * B + R0) * S{k}; "
                     f"LD[{sl[('new', k)]}] = S{k};")
        for bi in range(len(p.boundaries)):
            L.append(f"    P[{sl[('bout', bi)]}] = bout{bi}_p + ({saved_t} * B + R0) * WO{bi}; "
                     f"LD[{sl[('bout', bi)]}] = WO{bi};")
            if bi not in self.bin_alias:
                L.append(f"    P[{sl[('bin', bi)]}] = bin{bi}_p + ({saved_t} * B + R0) * WI{bi}; "
                         f"LD[{sl[('bin', bi)]}] = WI{bi};")
        for (s, f) in sorted(self.ncross):
            i = sl[("cross", s, f)]
            L.append(f"    P[{i}] = cross{s}_{f}_p + ({saved_t} * B + R0) * WC{s}_{f}; "
                     f"LD[{i}] = WC{s}_{f};")
        return L

    def fwd_driver(self, kernels) -> str:
        p, sl = self.p, self.slots
        L = [
            "template <typename T>",
            f"static std::vector<at::Tensor> fwd_{self.tag}_impl(const at::Tensor& xp, "
            "at::TensorList state0, at::TensorList vecs, at::TensorList mats, "
            "at::TensorList packed, const at::Tensor& drop, at::TensorList zone, "
            "at::IntArrayRef zmode, const at::Tensor& valid, at::IntArrayRef units, bool save) {",
            *self._common(),
            "  const int64_t TS = save ? T_ : 1;",
            "  std::vector<at::Tensor> res;",
            "  T* xp_p = xp.data_ptr<T>();",
        ]
        for k in range(len(p.states)):
            L.append(f"  at::Tensor seq{k} = pooled({{T_, B, S{k}}}, opts, false); "
                     f"T* seq{k}_p = seq{k}.data_ptr<T>(); res.push_back(seq{k});")
        saved = []
        for bi in range(len(p.boundaries)):
            for nm, w in (("bin", "WI"), ("bout", "WO")):
                key = self.bin_alias.get(bi) if nm == "bin" else None
                if key is not None:  # saved as its source (the backward reads it there)
                    saved.append("xp" if key == ("xp",) else f"bout{key[1]}")
                    continue
                L.append(f"  at::Tensor {nm}{bi} = pooled({{TS, B, {w}{bi}}}, opts, false); "
                         f"T* {nm}{bi}_p = {nm}{bi}.data_ptr<T>();")
                saved.append(f"{nm}{bi}")
        for (s, f) in sorted(self.ncross):
            L.append(f"  at::Tensor cross{s}_{f} = pooled({{TS, B, WC{s}_{f}}}, opts, false); "
                     f"T* cross{s}_{f}_p = cross{s}_{f}.data_ptr<T>();")
            saved.append(f"cross{s}_{f}")
        for bi in self._lns():  # each row's mean and rstd, for the backward
            L.append(f"  at::Tensor st{bi} = pooled({{TS, B, 2}}, opts, false); "
                     f"T* st{bi}_p = st{bi}.data_ptr<T>();")
            saved.append(f"st{bi}")
        L += self._chunk_open("mats")
        L.append("  for (int64_t t = 0; t < T_; ++t) {")
        L.append("    const int64_t ts = save ? t : 0;")
        L += self._step_ptrs("ts")
        L += self._alias_ptrs(False)
        for s in range(self.S):
            if s > 0:
                L += self._boundaries_fwd(s)
            for f in range(p.nfam):
                if (False, s, f) in kernels:
                    L.append(self._call(kernels, False, s, f))
        for k in range(len(p.states)):
            L.append(f"    post_fwd<T>(P[{sl[('new', k)]}], P[{sl[('state', k)]}], "
                     f"zmode[{k}] ? zone[{k}].data_ptr<T>() + (zmode[{k}] == 2 ? (t * B + R0) * S{k} "
                     f": 0) : nullptr, zmode[{k}], vptr ? vptr + t * B + R0 : nullptr, NB, S{k});")
        L.append("  }")
        L.append("  };")
        L.append(f"  batch_split(B, T_ * {self._row_cost()}, chunk);")
        L.append("  if (save) {")
        for nm in saved:
            L.append(f"    res.push_back({nm});")
        L.append("  }")
        L.append("  return res;")
        L.append("}")
        return "\n".join(L)

    def _boundaries_fwd(self, s: int, step: bool = False) -> list[str]:
        """The forward of stage ``s``'s boundaries: matrix products (the time loop's ``gemm`` on
        ``mats``/``packed``, or with ``step`` the streaming step's ``linear`` on the layer's raw
        matrices) and layer norms."""
        L = []
        sl = self.slots
        for bi, b in enumerate(self.p.boundaries):
            if b.stage != s:
                continue
            out, inp = f"P[{sl[('bout', bi)]}], WO{bi}", f"P[{sl[('bin', bi)]}], WI{bi}"
            if b.kind == "mm" and step:
                L.append(f"    linear<T>({out}, {inp}, NB, static_cast<const T*>(Ly.mats[{b.mat}]), "
                         f"Ly.mat_ld[{b.mat}], WI{bi}, WO{bi}, nullptr);")
            elif b.kind == "mm":
                L.append(f"    gemm<T>({out}, {inp}, NB, mats[{b.mat}], "
                         f"packed.empty() ? nullptr : &packed[{2 * b.mat}], &tiled[{b.mat}]);")
            else:
                w = f"P[{sl[('vec', b.weight)]}]" if b.weight >= 0 else "nullptr"
                c = f"P[{sl[('vec', b.bias)]}]" if b.bias >= 0 else "nullptr"
                st = "nullptr" if step else f"st{bi}_p + (ts * B + R0) * 2"
                L.append(f"    ln_fwd<T>(P[{sl[('bin', bi)]}], P[{sl[('bout', bi)]}], {w}, {c}, "
                         f"NB, WI{bi}, {b.eps!r}, {st});")
        return L

    def step_driver(self, kernels) -> str:
        """One time step for streaming: the forward's kernels on scratch from ``gyre_stream::Work``
        (no allocation once grown), the matrix products by ``linear`` (the input projection too
        when ``L.wih`` is set), the new state written to ``sout`` (``sin[k]`` null: zeros)."""
        p, sl = self.p, self.slots
        nb = len(p.boundaries)
        K = len(p.states)
        L = [
            "template <typename T>",
            f"static void step_{self.tag}_impl(const gyre_stream::Layer& Ly, int64_t B, "
            "const T* xin, T* const* sin, T* const* sout, gyre_stream::Work& wk) {",
            f"  int64_t U[{max(p.nfam, 1)}];",
            f"  for (int64_t f = 0; f < {p.nfam}; ++f) U[f] = Ly.units[f];",
            f"  const int64_t W_xp = {self.width(*p.xp)}, W_dr = {self.width(*p.drop)};",
        ]
        for k, st in enumerate(p.states):
            L.append(f"  const int64_t S{k} = {self.width(*st)};")
        for bi, b in enumerate(p.boundaries):
            L.append(f"  const int64_t WI{bi} = {self.width(b.in_fam, len(b.inputs))};")
            L.append(f"  const int64_t WO{bi} = {self.width(b.out_fam, b.out_blocks)};")
        for (s, f), n in sorted(self.ncross.items()):
            L.append(f"  const int64_t WC{s}_{f} = {self.width(f, n)};")
        sizes = ["(Ly.wih ? B * W_xp : 0)", "W_dr"]
        sizes += [f"B * S{k}" for k in range(K)]
        sizes += [f"B * (WI{bi} + WO{bi})" for bi in range(nb)]
        sizes += [f"B * WC{s}_{f}" for (s, f) in sorted(self.ncross)]
        n_bufs = 3 + K + 2 * nb + len(self.ncross)
        L += [
            f"  T* cur = wk.get<T>({' + '.join(sizes)} + {n_bufs} * 64);",
            "  const int64_t NB = B;",
            f"  T* P[{len(self.slots)}] = {{}};",
            f"  int64_t LD[{len(self.slots)}] = {{}};",
            "  if (Ly.wih) {",
            "    T* xp = carve(cur, B * W_xp);",
            "    linear<T>(xp, W_xp, xin, Ly.in_size, B, static_cast<const T*>(Ly.wih), Ly.wih_ld, "
            "Ly.in_size, W_xp, static_cast<const T*>(Ly.bih));",
            f"    P[{sl[('xp',)]}] = xp;",
            "  } else {",
            f"    P[{sl[('xp',)]}] = const_cast<T*>(xin);",
            "  }",
            f"  LD[{sl[('xp',)]}] = W_xp;",
            "  T* ones = carve(cur, W_dr);",
            "  for (int64_t j = 0; j < W_dr; ++j) ones[j] = T(1);",
            f"  P[{sl[('drop',)]}] = ones; LD[{sl[('drop',)]}] = 0;  // no recurrent dropout",
        ]
        for i in range(len(p.vecs)):
            L.append(f"  P[{sl[('vec', i)]}] = const_cast<T*>(static_cast<const T*>(Ly.vecs[{i}]));")
        for k in range(K):
            L += [
                f"  if (sin[{k}]) {{ P[{sl[('state', k)]}] = sin[{k}]; }} else {{",
                f"    P[{sl[('state', k)]}] = carve(cur, B * S{k});",
                f"    std::memset(P[{sl[('state', k)]}], 0, sizeof(T) * B * S{k});",
                "  }",
                f"  LD[{sl[('state', k)]}] = S{k};",
                f"  P[{sl[('new', k)]}] = sout[{k}]; LD[{sl[('new', k)]}] = S{k};",
            ]
        for bi in range(nb):
            if bi not in self.bin_alias:
                L.append(f"  P[{sl[('bin', bi)]}] = carve(cur, B * WI{bi}); "
                         f"LD[{sl[('bin', bi)]}] = WI{bi};")
            L.append(f"  P[{sl[('bout', bi)]}] = carve(cur, B * WO{bi}); LD[{sl[('bout', bi)]}] = WO{bi};")
        L += self._alias_ptrs(False)
        for (s, f) in sorted(self.ncross):
            i = sl[("cross", s, f)]
            L.append(f"  P[{i}] = carve(cur, B * WC{s}_{f}); LD[{i}] = WC{s}_{f};")
        for s in range(self.S):
            if s > 0:
                L += self._boundaries_fwd(s, step=True)
            for f in range(p.nfam):
                if (False, s, f) in kernels:
                    L.append(self._call(kernels, False, s, f).strip())
        for k in range(K):
            L.append(f"  if (Ly.zone[{k}] >= 0) {{ const T z = T(Ly.zone[{k}]); "
                     f"post_fwd<T>(P[{sl[('new', k)]}], P[{sl[('state', k)]}], &z, 1, nullptr, B, "
                     f"S{k}); }}")
        L.append("}")
        L += [
            f"__attribute__((visibility(\"hidden\"))) void step_{self.tag}(bool dbl, "
            "const gyre_stream::Layer& Ly, int64_t B, const void* xin, void* const* sin, "
            "void* const* sout, gyre_stream::Work& wk) {",
            f"  if (dbl) step_{self.tag}_impl<double>(Ly, B, static_cast<const double*>(xin), "
            "reinterpret_cast<double* const*>(sin), reinterpret_cast<double* const*>(sout), wk);",
            f"  else step_{self.tag}_impl<float>(Ly, B, static_cast<const float*>(xin), "
            "reinterpret_cast<float* const*>(sin), reinterpret_cast<float* const*>(sout), wk);",
            "}",
        ]
        return "\n".join(L)

    def bwd_driver(self, kernels) -> str:
        p, sl = self.p, self.slots
        nb = len(p.boundaries)
        L = [
            "template <typename T>",
            f"static std::vector<at::Tensor> bwd_{self.tag}_impl(at::TensorList gseq, "
            "const at::Tensor& xp, at::TensorList state0, at::TensorList seq, "
            "at::TensorList vecs, at::TensorList mats, at::TensorList packed, "
            "const at::Tensor& drop, at::TensorList zone, at::IntArrayRef zmode, "
            "const at::Tensor& valid, at::TensorList saved, at::IntArrayRef units) {",
            *self._common(),
            "  T* xp_p = xp.data_ptr<T>();",
        ]
        if self.dxp_alias is None:
            L.append(f"  at::Tensor dxp = pooled(xp.sizes(), opts, "
                     f"{'true' if self._needs_zero(('dxp',), p.xp[1]) else 'false'}); "
                     "T* dxp_p = dxp.data_ptr<T>();")
        else:
            L.append("  at::Tensor dxp; T* dxp_p = nullptr;  // the same values as a dbout")
        for k in range(len(p.states)):
            L.append(f"  T* seq{k}_p = seq[{k}].data_ptr<T>();")
            L.append(f"  T* gseq{k}_p = gseq[{k}].data_ptr<T>();")
            L.append(f"  at::Tensor dstate{k} = at::zeros({{B, S{k}}}, opts), "
                     f"gn{k} = at::empty({{B, S{k}}}, opts);")
            L.append(f"  P0[{sl[('dstate', k)]}] = dstate{k}.data_ptr<T>(); "
                     f"LD0[{sl[('dstate', k)]}] = S{k};")
            L.append(f"  P0[{sl[('gn', k)]}] = gn{k}.data_ptr<T>(); LD0[{sl[('gn', k)]}] = S{k};")
        i = 0
        for bi in range(nb):
            L.append(f"  const at::Tensor& bin{bi} = saved[{i}]; const at::Tensor& bout{bi} = "
                     f"saved[{i + 1}];")
            L.append(f"  T* bin{bi}_p = bin{bi}.data_ptr<T>(); T* bout{bi}_p = bout{bi}.data_ptr<T>();")
            init = "true" if self._needs_zero(("dbout", bi), p.boundaries[bi].out_blocks) \
                else "false"
            rows = "B" if bi in self._step_dbouts() else "T_, B"
            L.append(f"  at::Tensor dbout{bi} = pooled({{{rows}, WO{bi}}}, opts, {init}); "
                     f"T* dbout{bi}_p = dbout{bi}.data_ptr<T>();")
            if self.dxp_alias == bi:
                L.append(f"  dxp = dbout{bi}; dxp_p = dbout{bi}_p;")
            if bi not in self.bin_alias:  # else its source's gradient, set every step
                L.append(f"  at::Tensor dbin{bi} = at::empty({{B, WI{bi}}}, opts); "
                         f"P0[{sl[('dbin', bi)]}] = dbin{bi}.data_ptr<T>(); "
                         f"LD0[{sl[('dbin', bi)]}] = WI{bi};")
            i += 2
        for (s, f) in sorted(self.ncross):
            L.append(f"  const at::Tensor& cross{s}_{f} = saved[{i}]; "
                     f"T* cross{s}_{f}_p = cross{s}_{f}.data_ptr<T>();")
            L.append(f"  at::Tensor dcross{s}_{f} = at::zeros({{B, WC{s}_{f}}}, opts); "
                     f"P0[{sl[('dcross', s, f)]}] = dcross{s}_{f}.data_ptr<T>(); "
                     f"LD0[{sl[('dcross', s, f)]}] = WC{s}_{f};")
            i += 1
        for bi in self._lns():
            L.append(f"  T* st{bi}_p = saved[{i}].data_ptr<T>();")
            i += 1
        L.append("  std::vector<at::Tensor> matsT;")
        L.append("  for (const auto& m : mats) matsT.push_back(m.t());")
        for v in range(len(p.vecs)):
            if v not in self.vec_alias:  # per-row sums over steps, summed over rows at the end
                L.append(f"  at::Tensor dvec{v} = at::zeros({{B, vecs[{v}].size(0)}}, opts); "
                         f"P0[{sl[('dvec', v)]}] = dvec{v}.data_ptr<T>(); "
                         f"LD0[{sl[('dvec', v)]}] = vecs[{v}].size(0);")
        L += self._chunk_open("matsT")
        L.append("  for (int64_t t = T_ - 1; t >= 0; --t) {")
        L += self._step_ptrs("t")
        L.append(f"    P[{sl[('dxp',)]}] = dxp_p + (t * B + R0) * W_xp; LD[{sl[('dxp',)]}] = W_xp;")
        for bi in range(nb):
            if bi in self._step_dbouts():
                L.append(f"    P[{sl[('dbout', bi)]}] = dbout{bi}_p + R0 * WO{bi}; "
                         f"LD[{sl[('dbout', bi)]}] = WO{bi};")
                if self._needs_zero(("dbout", bi), p.boundaries[bi].out_blocks):
                    L.append(f"    std::memset(P[{sl[('dbout', bi)]}], 0, sizeof(T) * NB * WO{bi});")
            else:
                L.append(f"    P[{sl[('dbout', bi)]}] = dbout{bi}_p + (t * B + R0) * WO{bi}; "
                         f"LD[{sl[('dbout', bi)]}] = WO{bi};")
        L += self._alias_ptrs(True)
        for k in range(len(p.states)):
            L.append(f"    post_bwd<T>(gseq{k}_p + (t * B + R0) * S{k}, P[{sl[('dstate', k)]}], "
                     f"P[{sl[('gn', k)]}], zmode[{k}] ? zone[{k}].data_ptr<T>() + "
                     f"(zmode[{k}] == 2 ? (t * B + R0) * S{k} : 0) : nullptr, zmode[{k}], "
                     f"vptr ? vptr + t * B + R0 : nullptr, NB, S{k});")
        for (s, f) in sorted(self.ncross):
            L.append(f"    std::memset(P[{sl[('dcross', s, f)]}], 0, sizeof(T) * NB * WC{s}_{f});")
        for s in reversed(range(self.S)):
            for f in range(p.nfam):
                if (True, s, f) in kernels:
                    L.append(self._call(kernels, True, s, f))
            if s > 0:
                for bi, b in enumerate(p.boundaries):
                    if b.stage != s:
                        continue
                    if b.kind == "mm":
                        L.append(f"    gemm<T>(P[{sl[('dbin', bi)]}], WI{bi}, "
                                 f"P[{sl[('dbout', bi)]}], WO{bi}, NB, matsT[{b.mat}], "
                                 f"packed.empty() ? nullptr : &packed[{2 * b.mat + 1}], "
                                 f"&tiled[{b.mat}]);")
                    else:
                        w = f"P[{sl[('vec', b.weight)]}]" if b.weight >= 0 else "nullptr"
                        dw = f"P[{sl[('dvec', b.weight)]}]" if b.weight >= 0 else "nullptr"
                        dc = f"P[{sl[('dvec', b.bias)]}]" if b.bias >= 0 and \
                            b.bias not in self.vec_alias else "nullptr"
                        L.append(f"    ln_bwd<T>(P[{sl[('bin', bi)]}], P[{sl[('dbout', bi)]}], "
                                 f"{w}, P[{sl[('dbin', bi)]}], {dw}, {dc}, NB, WI{bi}, "
                                 f"{b.eps!r}, st{bi}_p + (t * B + R0) * 2);")
        L.append("  }")
        L.append("  };")
        L.append(f"  batch_split(B, T_ * {self._row_cost()}, chunk);")
        # a bias gradient that sums the right operand of a weight gradient's product comes out of
        # that product (summed while its blocks are in cache) instead of another pass over all T*B rows
        folded: dict[int, int] = {}  # mm boundary -> the vec whose gradient it sums
        for v, key in self.vec_alias.items():
            for bi, b in enumerate(p.boundaries):
                if b.kind == "mm" and bi not in folded and (
                        key == ("dbout", bi) or (key == ("dxp",) and self.dxp_alias == bi)):
                    folded[bi] = v
                    L.append(f"  at::Tensor dsum{v} = at::zeros({{WO{bi}}}, opts);")
                    break
        for m in range(len(p.mats)):
            terms = [bi for bi, b in enumerate(p.boundaries) if b.kind == "mm" and b.mat == m]
            fill = "zeros" if not terms else "empty"
            L.append(f"  at::Tensor dmat{m} = at::{fill}(mats[{m}].sizes(), opts);")
            for n, bi in enumerate(terms):
                bsum = f"dsum{folded[bi]}.data_ptr<T>()" if bi in folded else "nullptr"
                L.append(f"  matmul_tn<T>(bin{bi}_p, dbout{bi}_p, dmat{m}.data_ptr<T>(), T_ * B, "
                         f"WI{bi}, WO{bi}, {'true' if n else 'false'}, {bsum});")
        sums = set(folded.values())
        L.append("  std::vector<at::Tensor> res{dxp};")
        for k in range(len(p.states)):
            L.append(f"  res.push_back(dstate{k});")
        for v in range(len(p.vecs)):
            key = self.vec_alias.get(v)
            if v in sums:
                L.append(f"  res.push_back(dsum{v});")
            elif key is None:
                L.append(f"  res.push_back(dvec{v}.sum(0));")
            elif key == ("dxp",):
                L.append("  res.push_back(dxp.view({T_ * B, W_xp}).sum(0));")
            else:
                L.append(f"  res.push_back(dbout{key[1]}.view({{T_ * B, WO{key[1]}}}).sum(0));")
        for m in range(len(p.mats)):
            L.append(f"  res.push_back(dmat{m});")
        L.append("  return res;")
        L.append("}")
        return "\n".join(L)


def program_source(prog: Program, tag: str) -> str:
    """Kernels and drivers (templates ``fwd_<tag>_impl<T>`` / ``bwd_<tag>_impl<T>``)."""
    return _Gen(prog, tag).source()


def entry_points(tag: str) -> tuple[str, str]:
    """The dtype-dispatching functions and their schema lines for ``tag``."""
    fn = f"""
std::vector<at::Tensor> fwd_{tag}(const at::Tensor& xp, at::TensorList state0,
    at::TensorList vecs, at::TensorList mats, at::TensorList packed, const at::Tensor& drop,
    at::TensorList zone, at::IntArrayRef zmode, const at::Tensor& valid, at::IntArrayRef units,
    bool save) {{
  if (xp.scalar_type() == at::kDouble)
    return fwd_{tag}_impl<double>(xp, state0, vecs, mats, packed, drop, zone, zmode, valid, units,
                                  save);
  TORCH_CHECK(xp.scalar_type() == at::kFloat, "gyre fused: float32 or float64 only");
  return fwd_{tag}_impl<float>(xp, state0, vecs, mats, packed, drop, zone, zmode, valid, units,
                               save);
}}
std::vector<at::Tensor> bwd_{tag}(at::TensorList gseq, const at::Tensor& xp,
    at::TensorList state0, at::TensorList seq, at::TensorList vecs, at::TensorList mats,
    at::TensorList packed, const at::Tensor& drop, at::TensorList zone, at::IntArrayRef zmode,
    const at::Tensor& valid, at::TensorList saved, at::IntArrayRef units) {{
  if (xp.scalar_type() == at::kDouble)
    return bwd_{tag}_impl<double>(gseq, xp, state0, seq, vecs, mats, packed, drop, zone, zmode,
                                  valid, saved, units);
  return bwd_{tag}_impl<float>(gseq, xp, state0, seq, vecs, mats, packed, drop, zone, zmode,
                               valid, saved, units);
}}
"""
    defs = (f'  m.def("fwd_{tag}(Tensor xp, Tensor[] state0, Tensor[] vecs, Tensor[] mats, '
            f'Tensor[] packed, Tensor drop, Tensor[] zone, int[] zmode, Tensor valid, '
            f'int[] units, bool save) -> Tensor[]", &fwd_{tag});\n'
            f'  m.def("bwd_{tag}(Tensor[] gseq, Tensor xp, Tensor[] state0, Tensor[] seq, '
            f'Tensor[] vecs, Tensor[] mats, Tensor[] packed, Tensor drop, Tensor[] zone, '
            f'int[] zmode, Tensor valid, Tensor[] saved, int[] units) -> Tensor[]", &bwd_{tag});')
    return fn, defs


#: The Python entry of a module's streaming steps, in its first translation unit: a plain
#: CPython module (``PyInit_<namespace>``, METH_FASTCALL functions taking ints), measured ~1.2 us
#: cheaper per call than a ``torch.ops`` schema and without pybind11's headers (+20-35 s of
#: compile per translation unit here). New tensors are wrapped with torch's exported
#: ``THPVariable_Wrap`` (torch is pinned; the module hash includes its version).
STREAM_MODULE = r"""
PyObject* THPVariable_Wrap(const at::TensorBase& var);  // libtorch_python
extern PyObject* THPVariableClass;  // torch.Tensor

namespace {

// torch.Tensor's instance layout (torch/csrc/autograd/python_variable.h, whose pybind11 headers
// would add ~20 s of compile): checked on every plan against data_ptr() seen from Python
struct PyTensor {
  PyObject_HEAD
  at::Tensor cdata;
};

struct StreamPlan {
  bool dbl = false, residual = false;
  std::vector<gyre_stream::Layer> layers;
  std::vector<int64_t> sizes;  // state sizes S_k
  int64_t out_size = 0, in_size = 0;
  gyre_stream::Work work;
  std::vector<double> ybuf[2], rbuf[2];
  // for step(): the module's parameters as registered, their storage and versions at make()
  bool objects = false, versions = false;
  std::vector<PyObject*> param_objs;  // strong references
  std::vector<at::Tensor> params;
  std::vector<const void*> param_ptrs;
  std::vector<int64_t> param_versions;
  ~StreamPlan() { for (PyObject* o : param_objs) Py_DECREF(o); }
};

const at::Tensor* tensor_of(PyObject* o, bool exact) {
  PyTypeObject* cls = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (cls == nullptr || !(exact ? Py_TYPE(o) == cls : PyObject_TypeCheck(o, cls))) return nullptr;
  return &reinterpret_cast<PyTensor*>(o)->cdata;
}

const char* kCapsule = "gyre_stream_plan";

struct StepEntry { const char* tag; gyre_stream::StepFn fn; };
const StepEntry kSteps[] = {
@@ENTRIES@@
  {nullptr, nullptr}};

bool as_i64(PyObject* o, int64_t* v) {
  *v = PyLong_AsLongLong(o);
  return !(*v == -1 && PyErr_Occurred());
}

void* as_ptr(PyObject* o) { return o == Py_None ? nullptr : PyLong_AsVoidPtr(o); }

bool i64_tuple(PyObject* o, std::vector<int64_t>* out) {
  PyObject* seq = PySequence_Fast(o, "expected a sequence of ints");
  if (!seq) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t v;
    if (!as_i64(PySequence_Fast_GET_ITEM(seq, i), &v)) { Py_DECREF(seq); return false; }
    out->push_back(v);
  }
  Py_DECREF(seq);
  return true;
}

void plan_free(PyObject* cap) {
  delete static_cast<StreamPlan*>(PyCapsule_GetPointer(cap, kCapsule));
}

// make(dbl, residual, sizes, out_size, layers, params, param_ptrs, versions, param_impls):
// layers a sequence of (tag, units, vecs, mats, mat_ld, wih, wih_ld, bih, in_size, zone, rout,
// rout_ld, rbias) with
// pointers as ints; params the module's parameters in registration order, param_ptrs their
// data_ptr()s, param_impls their ._cdata (TensorImpl addresses)
PyObject* stream_make(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n != 9) { PyErr_SetString(PyExc_TypeError, "make: 9 arguments"); return nullptr; }
  auto pl = std::make_unique<StreamPlan>();
  int64_t v;
  if (!as_i64(a[0], &v)) return nullptr;
  pl->dbl = v != 0;
  if (!as_i64(a[1], &v)) return nullptr;
  pl->residual = v != 0;
  if (!i64_tuple(a[2], &pl->sizes) || !as_i64(a[3], &pl->out_size)) return nullptr;
  if (pl->sizes.empty() || pl->sizes.size() > 16) {
    PyErr_SetString(PyExc_ValueError, "make: 1 to 16 state components");
    return nullptr;
  }
  PyObject* seq = PySequence_Fast(a[4], "make: layers must be a sequence");
  if (!seq) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(seq, i);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 13) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError, "make: a layer is a tuple of 13");
      return nullptr;
    }
    gyre_stream::Layer ly;
    const char* tag = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 0));
    for (const StepEntry* e = kSteps; tag && e->tag; ++e)
      if (std::strcmp(e->tag, tag) == 0) ly.fn = e->fn;
    std::vector<int64_t> units, vecs, mats, ld;
    bool ok = tag && ly.fn && i64_tuple(PyTuple_GET_ITEM(t, 1), &units) && units.size() <= 4 &&
              i64_tuple(PyTuple_GET_ITEM(t, 2), &vecs) && i64_tuple(PyTuple_GET_ITEM(t, 3), &mats) &&
              i64_tuple(PyTuple_GET_ITEM(t, 4), &ld) && mats.size() == ld.size() &&
              as_i64(PyTuple_GET_ITEM(t, 6), &ly.wih_ld) &&
              as_i64(PyTuple_GET_ITEM(t, 8), &ly.in_size) &&
              as_i64(PyTuple_GET_ITEM(t, 11), &ly.rout_ld);
    if (ok) {
      ly.wih = as_ptr(PyTuple_GET_ITEM(t, 5));
      ly.bih = as_ptr(PyTuple_GET_ITEM(t, 7));
      ly.rout = as_ptr(PyTuple_GET_ITEM(t, 10));
      ly.rbias = as_ptr(PyTuple_GET_ITEM(t, 12));
      PyObject* z = PySequence_Fast(PyTuple_GET_ITEM(t, 9), "zone rates");
      ok = z != nullptr && !PyErr_Occurred();
      for (Py_ssize_t k = 0; ok && k < PySequence_Fast_GET_SIZE(z); ++k) {
        ly.zone.push_back(PyFloat_AsDouble(PySequence_Fast_GET_ITEM(z, k)));
        ok = !PyErr_Occurred();
      }
      Py_XDECREF(z);
      ok = ok && ly.zone.size() == pl->sizes.size();
    }
    if (!ok) {
      Py_DECREF(seq);
      if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "make: bad layer %zd (tag %s)", i, tag ? tag : "?");
      return nullptr;
    }
    for (size_t f = 0; f < units.size(); ++f) ly.units[f] = units[f];
    for (int64_t p : vecs) ly.vecs.push_back(reinterpret_cast<const void*>(p));
    for (int64_t p : mats) ly.mats.push_back(reinterpret_cast<const void*>(p));
    ly.mat_ld = ld;
    pl->layers.push_back(std::move(ly));
  }
  Py_DECREF(seq);
  if (pl->layers.empty()) { PyErr_SetString(PyExc_ValueError, "make: no layers"); return nullptr; }
  pl->in_size = pl->layers[0].in_size;
  std::vector<int64_t> ptrs, impls;
  if (!as_i64(a[7], &v) || !i64_tuple(a[6], &ptrs) || !i64_tuple(a[8], &impls)) return nullptr;
  pl->versions = v != 0;
  PyObject* ps = PySequence_Fast(a[5], "make: params must be a sequence");
  if (!ps) return nullptr;
  pl->objects = size_t(PySequence_Fast_GET_SIZE(ps)) == ptrs.size() && ptrs.size() == impls.size();
  static_assert(sizeof(at::Tensor) == sizeof(void*), "at::Tensor is one TensorImpl pointer");
  for (Py_ssize_t i = 0; pl->objects && i < PySequence_Fast_GET_SIZE(ps); ++i) {
    PyObject* o = PySequence_Fast_GET_ITEM(ps, i);
    const at::Tensor* t = tensor_of(o, false);
    // the layout check, before anything is dereferenced: the word after the object header is
    // the TensorImpl Python reports, and through it the storage Python sees
    int64_t impl = 0;
    if (t) std::memcpy(&impl, static_cast<const void*>(t), sizeof(impl));
    if (!t || impl == 0 || impl != impls[i] ||
        reinterpret_cast<int64_t>(t->data_ptr()) != ptrs[i]) {
      pl->objects = false;
      break;
    }
    Py_INCREF(o);
    pl->param_objs.push_back(o);
    pl->params.push_back(*t);
    pl->param_ptrs.push_back(t->data_ptr());
    pl->param_versions.push_back(t->_version());
  }
  Py_DECREF(ps);
  return PyCapsule_New(pl.release(), kCapsule, plan_free);
}

// the whole stack, each layer's output its state component 0 or its folded read-out product,
// every input projection folded: outputs (y, state_0, ..., state_{K-1}), new tensors
template <typename T>
void run_stack(StreamPlan& pl, int64_t B, const T* x, T* const* in, T* const* out, T* y) {
  const int64_t L = pl.layers.size(), K = pl.sizes.size(), O = pl.out_size;
  void* sin[16];
  void* sout[16];
  const T* xin = x;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t k = 0; k < K; ++k) {
      sin[k] = in[k] ? in[k] + l * B * pl.sizes[k] : nullptr;
      sout[k] = out[k] + l * B * pl.sizes[k];
    }
    const auto& ly = pl.layers[l];
    ly.fn(pl.dbl, ly, B, xin, sin, sout, pl.work);
    const T* h = static_cast<const T*>(sout[0]);
    if (ly.rout) {  // the read-out product (two buffers: the previous one may be xin)
      auto& v = pl.rbuf[l % 2];
      if (v.size() < size_t(B * O)) v.resize(B * O);
      T* r = reinterpret_cast<T*>(v.data());
      linear<T>(r, O, h, pl.sizes[0], B, static_cast<const T*>(ly.rout), ly.rout_ld, pl.sizes[0],
                O, static_cast<const T*>(ly.rbias));
      h = r;
    }
    const bool last = l == L - 1;
    if (pl.residual && l > 0) {
      T* dst = y;
      if (!last) {
        auto& v = pl.ybuf[l % 2];
        if (v.size() < size_t(B * O)) v.resize(B * O);
        dst = reinterpret_cast<T*>(v.data());
      }
#pragma omp simd
      for (int64_t i = 0; i < B * O; ++i) dst[i] = h[i] + xin[i];
      xin = dst;
    } else if (last) {
      std::memcpy(y, h, sizeof(T) * B * O);
    } else {
      xin = h;
    }
  }
}

StreamPlan* get_plan(PyObject* cap) {
  return static_cast<StreamPlan*>(PyCapsule_GetPointer(cap, kCapsule));
}

// new outputs, every layer run into them, then (y, state_0, ..., state_{K-1}) or, nested,
// (y, state) with state a tensor (K = 1) or a tuple
PyObject* run_and_wrap(StreamPlan& pl, int64_t B, bool unbatched, const void* x, void* const* in,
                       bool nested) {
  const int64_t K = pl.sizes.size(), L = pl.layers.size();
  at::Tensor outs[16], y;
  try {
    const auto opts = at::TensorOptions().dtype(pl.dbl ? at::kDouble : at::kFloat);
    void* out[16];
    for (int64_t k = 0; k < K; ++k) {
      outs[k] = unbatched ? at::empty({L, pl.sizes[k]}, opts) : at::empty({L, B, pl.sizes[k]}, opts);
      out[k] = outs[k].data_ptr();
    }
    y = unbatched ? at::empty({pl.out_size}, opts) : at::empty({B, pl.out_size}, opts);
    if (pl.dbl)
      run_stack<double>(pl, B, static_cast<const double*>(x), reinterpret_cast<double* const*>(in),
                        reinterpret_cast<double* const*>(out), y.data_ptr<double>());
    else
      run_stack<float>(pl, B, static_cast<const float*>(x), reinterpret_cast<float* const*>(in),
                       reinterpret_cast<float* const*>(out), y.data_ptr<float>());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  PyObject* items[17];
  bool ok = true;
  for (int64_t i = 0; i <= K; ++i) {
    items[i] = THPVariable_Wrap(i == 0 ? y : outs[i - 1]);
    ok = ok && items[i] != nullptr;
  }
  PyObject* res = nullptr;
  if (ok && !nested) {
    res = PyTuple_New(1 + K);
    for (int64_t i = 0; res && i <= K; ++i) PyTuple_SET_ITEM(res, i, items[i]);
  } else if (ok) {
    PyObject* state = K == 1 ? items[1] : PyTuple_New(K);
    for (int64_t k = 0; K > 1 && state && k < K; ++k) PyTuple_SET_ITEM(state, k, items[1 + k]);
    res = state ? PyTuple_New(2) : nullptr;
    if (res) {
      PyTuple_SET_ITEM(res, 0, items[0]);
      PyTuple_SET_ITEM(res, 1, state);
    } else if (state && K > 1) {
      Py_DECREF(state);  // owns items[1..K]
      Py_DECREF(items[0]);
      return nullptr;
    }
  }
  if (!res)
    for (int64_t i = 0; i <= K; ++i) Py_XDECREF(items[i]);
  return res;
}

// run(plan, B, unbatched, x, in_0, ..., in_{K-1}) -> (y, state_0, ..., state_{K-1})
PyObject* stream_run(PyObject*, PyObject* const* a, Py_ssize_t n) {
  StreamPlan* pl = n >= 4 ? get_plan(a[0]) : nullptr;
  if (!pl) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "run: bad call"); return nullptr; }
  const int64_t K = pl->sizes.size();
  int64_t B, unbatched;
  if (n != 4 + K || !as_i64(a[1], &B) || !as_i64(a[2], &unbatched)) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "run: bad arguments");
    return nullptr;
  }
  void* x = as_ptr(a[3]);
  void* in[16];
  for (int64_t k = 0; k < K; ++k) in[k] = as_ptr(a[4 + k]);
  if (PyErr_Occurred()) return nullptr;
  return run_and_wrap(*pl, B, unbatched != 0, x, in, false);
}

// the plan's parameters are still the module's, unchanged (same objects, storage, versions)
bool params_current(const StreamPlan& pl, PyObject* dict) {
  if (!PyDict_Check(dict) || size_t(PyDict_Size(dict)) != pl.param_objs.size()) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (value != pl.param_objs[i]) return false;
    const at::Tensor& t = pl.params[i];
    if (t.data_ptr() != pl.param_ptrs[i] || (pl.versions && t._version() != pl.param_versions[i]))
      return false;
    ++i;
  }
  return true;
}

// a tensor step() can read in place: exactly torch.Tensor, CPU, strided, contiguous, the dtype
const at::Tensor* usable(PyObject* o, at::ScalarType dt, bool grad) {
  const at::Tensor* t = tensor_of(o, true);
  if (!t || !t->defined() || t->scalar_type() != dt || !t->is_cpu() ||
      t->layout() != at::kStrided || !t->is_contiguous() || (grad && t->requires_grad()))
    return nullptr;
  return t;
}

// step(plan, params, x, state) -> (y, state), or None where this fast entry does not apply
// (parameters changed, grad needed, anything unusual about x or state): the caller then takes
// the careful path. Only for stacks run() can take (folded projections, identity read-out).
PyObject* stream_step(PyObject*, PyObject* const* a, Py_ssize_t n) {
  StreamPlan* pl = n == 4 ? get_plan(a[0]) : nullptr;
  if (!pl) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "step: bad call"); return nullptr; }
  if (!pl->objects || !params_current(*pl, a[1])) Py_RETURN_NONE;
  const bool grad = c10::GradMode::is_enabled();
  if (grad) {
    for (const auto& p : pl->params) if (p.requires_grad()) Py_RETURN_NONE;
  }
  const at::ScalarType dt = pl->dbl ? at::kDouble : at::kFloat;
  const at::Tensor* x = usable(a[2], dt, grad);
  if (!x) Py_RETURN_NONE;
  const int64_t L = pl->layers.size(), K = pl->sizes.size();
  const bool unbatched = x->dim() == 1;
  if ((x->dim() != 1 && x->dim() != 2) || x->size(-1) != pl->in_size) Py_RETURN_NONE;
  const int64_t B = unbatched ? 1 : x->size(0);
  if (B == 0) Py_RETURN_NONE;
  void* in[16] = {};
  PyObject* st = a[3];
  if (st != Py_None) {
    PyObject* const* items = &st;
    Py_ssize_t count = 1;
    if (PyTuple_Check(st) || PyList_Check(st)) {
      items = PySequence_Fast_ITEMS(st);
      count = PySequence_Fast_GET_SIZE(st);
    }
    if (count != K) Py_RETURN_NONE;
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor* s = usable(items[k], dt, grad);
      if (!s) Py_RETURN_NONE;
      if (unbatched ? (s->dim() != 2 || s->size(0) != L || s->size(1) != pl->sizes[k])
                    : (s->dim() != 3 || s->size(0) != L || s->size(1) != B ||
                       s->size(2) != pl->sizes[k]))
        Py_RETURN_NONE;
      in[k] = s->data_ptr();
    }
  }
  return run_and_wrap(*pl, B, unbatched, x->data_ptr(), in, true);
}

// layer(plan, l, B, xin, in_0.., out_0..): one layer into caller-given (L, B, S_k) states; xin
// is the layer's input when its projection is folded, else its pre-activations (B, G*H)
PyObject* stream_layer(PyObject*, PyObject* const* a, Py_ssize_t n) {
  StreamPlan* pl = n >= 4 ? get_plan(a[0]) : nullptr;
  if (!pl) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "layer: bad call"); return nullptr; }
  const int64_t K = pl->sizes.size();
  int64_t l, B;
  if (n != 4 + 2 * K || !as_i64(a[1], &l) || !as_i64(a[2], &B) || l < 0 ||
      l >= int64_t(pl->layers.size())) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "layer: bad arguments");
    return nullptr;
  }
  const size_t es = pl->dbl ? sizeof(double) : sizeof(float);
  void* xin = as_ptr(a[3]);
  void* sin[16];
  void* sout[16];
  for (int64_t k = 0; k < K; ++k) {
    char* i = static_cast<char*>(as_ptr(a[4 + k]));
    sin[k] = i ? i + es * l * B * pl->sizes[k] : nullptr;
    sout[k] = static_cast<char*>(as_ptr(a[4 + K + k])) + es * l * B * pl->sizes[k];
  }
  if (PyErr_Occurred()) return nullptr;
  try {
    const auto& ly = pl->layers[l];
    ly.fn(pl->dbl, ly, B, xin, sin, sout, pl->work);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef kStreamMethods[] = {
    {"make", (PyCFunction)(void (*)(void))stream_make, METH_FASTCALL, "a streaming plan"},
    {"run", (PyCFunction)(void (*)(void))stream_run, METH_FASTCALL, "one step, every layer"},
    {"step", (PyCFunction)(void (*)(void))stream_step, METH_FASTCALL, "run() on tensors, or None"},
    {"layer", (PyCFunction)(void (*)(void))stream_layer, METH_FASTCALL, "one step, one layer"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kStreamModule = {PyModuleDef_HEAD_INIT, "@@NS@@", "gyre streaming steps", -1,
                             kStreamMethods};

}  // namespace

PyMODINIT_FUNC PyInit_@@NS@@(void) { return PyModule_Create(&kStreamModule); }
"""


#: Products over all ``T*B`` rows on the tiled kernel, one pair per module (its first translation
#: unit): ``mm_rows(a, mat, bias)`` = ``a @ mat (+ bias)`` (the input projection with ``mat`` the
#: transposed weight, and its input gradient) and ``mm_tn(a, b, sum_b)`` = ``[a^T @ b]`` (its weight
#: gradient), with ``b.sum(0)`` after it when ``sum_b`` (the bias's); float32 and float64 on CPU.
PRODUCTS = r"""
namespace {
template <typename T>
void mm_rows_t(const at::Tensor& a, const at::Tensor& mat, const at::Tensor* bias, at::Tensor& out) {
  Packed pk = pack<T>(mat);
  mm_rows<T>(a.data_ptr<T>(), a.stride(0), a.size(0), pk, out.data_ptr<T>(), out.size(1),
             bias == nullptr ? nullptr : bias->data_ptr<T>());
}

at::Tensor mm_rows_op(const at::Tensor& a_, const at::Tensor& mat,
                      const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(a_.dim() == 2 && mat.dim() == 2 && a_.size(1) == mat.size(0),
              "gyre mm_rows: a (M x K) and mat (K x N) expected");
  TORCH_CHECK(a_.scalar_type() == mat.scalar_type() && a_.device().is_cpu() && mat.device().is_cpu()
              && (a_.scalar_type() == at::kFloat || a_.scalar_type() == at::kDouble),
              "gyre mm_rows: float32 or float64 CPU tensors of one dtype expected");
  const int64_t M = a_.size(0), K = a_.size(1), N = mat.size(1);
  const at::Tensor a = a_.stride(1) == 1 && a_.stride(0) >= K ? a_ : a_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->numel() == N && bias_->scalar_type() == a.scalar_type(),
                "gyre mm_rows: bias of mat's N elements expected");
    bias = bias_->contiguous();
  }
  at::Tensor out = at::empty({M, N}, a.options());
  const at::Tensor* b = bias.defined() ? &bias : nullptr;
  if (a.scalar_type() == at::kDouble) mm_rows_t<double>(a, mat, b, out);
  else mm_rows_t<float>(a, mat, b, out);
  return out;
}

std::vector<at::Tensor> mm_tn_op(const at::Tensor& a_, const at::Tensor& b_, bool sum_b) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.size(0) == b_.size(0),
              "gyre mm_tn: a (K x M) and b (K x N) expected");
  TORCH_CHECK(a_.scalar_type() == b_.scalar_type() && a_.device().is_cpu() && b_.device().is_cpu()
              && (a_.scalar_type() == at::kFloat || a_.scalar_type() == at::kDouble),
              "gyre mm_tn: float32 or float64 CPU tensors of one dtype expected");
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  std::vector<at::Tensor> res{out};
  if (sum_b) res.push_back(at::zeros({N}, a.options()));
  if (a.scalar_type() == at::kDouble)
    matmul_tn<double>(a.data_ptr<double>(), b.data_ptr<double>(), out.data_ptr<double>(), K, M, N,
                      false, sum_b ? res[1].data_ptr<double>() : nullptr);
  else
    matmul_tn<float>(a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), K, M, N,
                     false, sum_b ? res[1].data_ptr<float>() : nullptr);
  return res;
}
}  // namespace
"""
PRODUCTS_DEFS = """  m.def("mm_rows(Tensor a, Tensor mat, Tensor? bias) -> Tensor", &mm_rows_op);
  m.def("mm_tn(Tensor a, Tensor b, bool sum_b) -> Tensor[]", &mm_tn_op);"""


def stream_source(namespace: str, tags: list[str]) -> str:
    """The Python streaming entry of a module holding the programs ``tags``."""
    decls = "".join(
        f'__attribute__((visibility("hidden"))) void step_{t}(bool, const gyre_stream::Layer&, '
        "int64_t, const void*, void* const*, void* const*, gyre_stream::Work&);\n" for t in tags)
    entries = "\n".join(f'  {{"{t}", &step_{t}}},' for t in tags)
    return decls + STREAM_MODULE.replace("@@ENTRIES@@", entries).replace("@@NS@@", namespace)


def module_source(namespace: str, programs: dict[str, str], part: int = 0,
                  parts: int = 1) -> str:
    """A translation unit holding every ``parts``-th of the programs ``{tag: source}`` (from
    ``part``), registered as ``torch.ops.<namespace>.fwd_<tag>`` / ``bwd_<tag>``; the first also
    holds the module's streaming entry (``PyInit_<namespace>``, :data:`STREAM_MODULE`)."""
    out = [PRELUDE, "#include <limits>"]
    defs = []
    for tag, src in sorted(programs.items())[part::parts]:
        fn, d = entry_points(tag)
        out += [src, fn]
        defs.append(d)
    if part == 0:
        out.append(PRODUCTS)
        defs.append(PRODUCTS_DEFS)
    macro = "TORCH_LIBRARY" if part == 0 else "TORCH_LIBRARY_FRAGMENT"
    out.append(f"{macro}({namespace}, m) {{\n" + "\n".join(defs) + "\n}")
    if part == 0:
        out.append(stream_source(namespace, sorted(programs)))
    return "\n".join(out)


__all__ = ["PRELUDE", "STREAM_MODULE", "Atom", "module_source", "program_source", "stream_source"]
