/* fused.py's three kernels as C loops for the CPU; cpu_kernels.py compiles this file at
   first use and calls it through ctypes. triton_kernels.py holds the same kernels for CUDA.
   Each kernel exists for float and double (suffixes f32 and f64) and takes the number of
   OpenMP threads last. */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* Per-thread partial sums, two arrays of C per thread, added up in thread order. */
static void combine(const double* part, int nt, int64_t C, double* u, double* v) {
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int t = 0; t < nt; ++t) {
      a += part[(size_t)t * 2 * C + c];
      b += part[(size_t)t * 2 * C + C + c];
    }
    u[c] = a; v[c] = b;
  }
}

/* Per channel, two sums over the P pixels: each thread adds BODY's terms for its pixels into
   su[c] and sv[c] (type T) over blocks of 64 pixels, then into double; the totals go to
   u and v. BODY sees p, the pixel index, and loops over c itself. */
#define PIXEL_SUMS(T, u, v, ...)                                                             \
  double* part = calloc((size_t)nt * 2 * C, sizeof(double));                                 \
  _Pragma("omp parallel num_threads(nt)")                                                    \
  {                                                                                          \
    int t = omp_get_thread_num(), n = omp_get_num_threads();                                 \
    int64_t lo = P * t / n, hi = P * (t + 1) / n;                                            \
    double* pu = part + (size_t)t * 2 * C; double* pv = pu + C;                              \
    T* su = calloc(2 * C, sizeof(T)); T* sv = su + C;                                        \
    for (int64_t p0 = lo; p0 < hi; p0 += 64) {                                               \
      int64_t p1 = p0 + 64 < hi ? p0 + 64 : hi;                                              \
      for (int64_t p = p0; p < p1; ++p) { __VA_ARGS__ }                                      \
      for (int64_t c = 0; c < C; ++c) { pu[c] += su[c]; pv[c] += sv[c]; su[c] = 0; sv[c] = 0; } \
    }                                                                                        \
    free(su);                                                                                \
  }                                                                                          \
  combine(part, nt, C, u, v);                                                                \
  free(part);

/* x: P pixels of C channels, pixel stride x_stride (a channels-last prefix); y: P pixels of
   y_stride >= C channels, the last y_stride - C of them zeros (a convolution's padded input).
   Every comparison is written so that a NaN passes through as in ATen: relu(NaN) is NaN, its
   gradient passes where y is NaN, and a NaN variance stays NaN. */
#define KERNELS(T, S)                                                                        \
void norm_relu_##S(const T* x, int64_t x_stride, int64_t P, int64_t C, const T* scale,            \
                   const T* shift, T* y, int64_t y_stride, int nt) {                         \
  _Pragma("omp parallel for num_threads(nt) schedule(static)")                               \
  for (int64_t p = 0; p < P; ++p) {                                                          \
    const T* xp = x + p * x_stride; T* yp = y + p * y_stride;                                     \
    _Pragma("omp simd")                                                                      \
    for (int64_t c = 0; c < C; ++c) { T v = xp[c] * scale[c] + shift[c]; yp[c] = v < 0 ? 0 : v; } \
    for (int64_t c = C; c < y_stride; ++c) yp[c] = 0;                                        \
  }                                                                                          \
}                                                                                            \
/* With gm = g * [y > 0] (g and y: pixel stride y_stride): out (pixel stride out_stride) += gm * a, \
   and per channel the sums of gm and of gm * (x - mean). */                                 \
void norm_relu_backward_##S(const T* g, const T* y, int64_t y_stride, const T* x, int64_t x_stride, \
                            int64_t P, int64_t C, const T* mean, const T* a, T* out,             \
                            int64_t out_stride, double* sum_g, double* sum_gx, int nt) {     \
  PIXEL_SUMS(T, sum_g, sum_gx,                                                               \
    const T* gp = g + p * y_stride; const T* yp = y + p * y_stride; const T* xp = x + p * x_stride; \
    T* op = out + p * out_stride;                                                                   \
    _Pragma("omp simd")                                                                      \
    for (int64_t c = 0; c < C; ++c) {                                                        \
      T gv = gp[c], m = yp[c] <= 0 ? 0 : gv;                                                 \
      op[c] += m * a[c]; su[c] += m; sv[c] += m * (xp[c] - mean[c]);                         \
    })                                                                                       \
}                                                                                            \
/* Mean and biased var of each channel of f, P pixels of C channels (pixel stride f_stride),   \
   and unless dst is NULL a copy of f into dst (pixel stride dst_stride). The sums are taken      \
   about the first pixel's value, which keeps E[x^2] - E[x]^2 from cancelling. */          \
void stats_##S(const T* f, int64_t f_stride, int64_t P, int64_t C, T* dst, int64_t dst_stride,          \
                double* mean, double* var, int nt) {                                         \
  PIXEL_SUMS(T, mean, var,                                                                   \
    const T* fp = f + p * f_stride;                                                               \
    if (dst) {                                                                               \
      T* dp = dst + p * dst_stride;                                                                 \
      _Pragma("omp simd")                                                                    \
      for (int64_t c = 0; c < C; ++c) dp[c] = fp[c];                                         \
    }                                                                                        \
    _Pragma("omp simd")                                                                      \
    for (int64_t c = 0; c < C; ++c) { T d = fp[c] - f[c]; su[c] += d; sv[c] += d * d; })     \
  for (int64_t c = 0; c < C; ++c) {                                                          \
    double m = mean[c] / P, s = var[c] / P - m * m;                                          \
    mean[c] = f[c] + m; var[c] = s < 0 ? 0 : s;                                              \
  }                                                                                          \
}

KERNELS(float, f32)
KERNELS(double, f64)
