/* Fused CPU kernels for mHC's per-token stream arithmetic (seekling/model/mhc_kernels.py builds and
 * loads this file; seekling/model/mhc.py says what each quantity is).
 *
 * Why C: per token, mHC mixes n streams of D floats with (n, n) and (n,) coefficients and runs a
 * 20-round Sinkhorn on an (n, n) matrix. PyTorch spends that as dozens of small ops, each a pass
 * over memory or a batched GEMM of 4x4 matrices; here each kernel is one pass over the tokens.
 *
 * Layout: every array is contiguous fp32, tokens first: x (N, n, D), f and y (N, D), pre and post
 * (N, n), comb (N, n, n) with comb[t, j, k] the weight of stream j in new stream k, raw (N, M) the
 * projection before its RMS scale r (N). Tokens are independent, so the OpenMP loops over them give
 * the same bits whatever the thread count. Sums over D are vectorised (`omp simd reduction`): their
 * rounding differs from PyTorch's order by a few ulps, which the tests allow.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

typedef int64_t i64;

/* Below this many tokens (decode) a parallel region costs more than it saves. */
#define PAR_MIN_TOKENS 64

static inline float dot(const float *a, const float *b, i64 D) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (i64 d = 0; d < D; d++) acc += a[d] * b[d];
    return acc;
}

static inline float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

/* ------------------------------------------------------------------ read: y = sum_j w_j x_j */

void hc_read_fwd(const float *x, const float *w, float *y, i64 N, i64 n, i64 D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N >= PAR_MIN_TOKENS)
    for (i64 t = 0; t < N; t++) {
        const float *xt = x + t * n * D, *wt = w + t * n;
        float *yt = y + t * D;
        const float w0 = wt[0];
#pragma omp simd
        for (i64 d = 0; d < D; d++) yt[d] = w0 * xt[d];
        for (i64 j = 1; j < n; j++) {
            const float wj = wt[j], *xj = xt + j * D;
#pragma omp simd
            for (i64 d = 0; d < D; d++) yt[d] += wj * xj[d];
        }
    }
}

/* gw[t, j] = x[t, j] . gy[t]: the read's gradient for its weights. */
void hc_read_bwd_w(const float *x, const float *gy, float *gw, i64 N, i64 n, i64 D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N >= PAR_MIN_TOKENS)
    for (i64 t = 0; t < N; t++)
        for (i64 j = 0; j < n; j++) gw[t * n + j] = dot(x + (t * n + j) * D, gy + t * D, D);
}

/* gx[t, j] += w[t, j] gy[t] + coef[t] x[t, j]: the read's gradient for the streams and the RMS
 * scale's (coef = -r^3/K sum_m g_m raw_m), added in one pass to the projection's GEMM output
 * (the GEMMs themselves stay with the BLAS: hand-blocked C loops measured slower than MKL there,
 * 2.4 / 4.1 / 3.5 ms against 2.2 / 1.7 / 1.6 ms for the three products at N = 2048, K = 1024). */
void hc_read_bwd_x(float *gx, const float *x, const float *gy, const float *w, const float *coef,
                   i64 N, i64 n, i64 D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N >= PAR_MIN_TOKENS)
    for (i64 t = 0; t < N; t++) {
        const float c = coef[t], *gyt = gy + t * D;
        for (i64 j = 0; j < n; j++) {
            const float wj = w[t * n + j], *xj = x + (t * n + j) * D;
            float *gj = gx + (t * n + j) * D;
#pragma omp simd
            for (i64 d = 0; d < D; d++) gj[d] += wj * gyt[d] + c * xj[d];
        }
    }
}

/* ------------------------------------------------------------------ write: x'_k = post_k f + sum_j comb[j,k] x_j */

/* n = 4 (DeepSeek-V4's hc_mult) spelled out on 8-float vectors (GNU C vector extensions, which gcc
 * and clang lower to AVX, SSE or NEON): each 8-float slice of the token is loaded once and every
 * output that needs it is computed from registers, the 20 dot products each in their own vector
 * accumulator. Written as loops over the streams (a dot product at a time, a pass per term), the
 * forward took 1.6 ms and this backward 3.5 ms at N = 2048, D = 256, 1 thread; `omp simd
 * reduction` over many variables becomes per-lane arrays in memory with gcc. */
typedef float v8 __attribute__((vector_size(32)));
#define V 8
static inline v8 load8(const float *p) {
    v8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
static inline void store8(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) {
    float s = 0.f;
    for (int l = 0; l < V; l++) s += v[l];
    return s;
}

/* x'_k = post_k f + sum_j comb[j,k] x_j for one token, n = 4, the first Dv floats (a multiple of 8). */
static void write_fwd4(const float *xt, const float *ft, const float *pt, const float *ct, float *ot, i64 D, i64 Dv) {
    for (i64 d = 0; d < Dv; d += V) {
        const v8 x0 = load8(xt + d), x1 = load8(xt + D + d), x2 = load8(xt + 2 * D + d), x3 = load8(xt + 3 * D + d);
        const v8 f = load8(ft + d);
        for (int k = 0; k < 4; k++)
            store8(ot + k * D + d, pt[k] * f + ct[k] * x0 + ct[4 + k] * x1 + ct[8 + k] * x2 + ct[12 + k] * x3);
    }
}

/* The backward of write_fwd4 over the first Dv floats; the dot products are returned unreduced (acc). */
static void write_bwd4(const float *gt, const float *xt, const float *ft, const float *pt, const float *ct,
                       float *gxt, float *gft, v8 acc[20], i64 D, i64 Dv) {
    for (int i = 0; i < 20; i++) acc[i] = (v8){0};
    for (i64 d = 0; d < Dv; d += V) {
        const v8 g0 = load8(gt + d), g1 = load8(gt + D + d), g2 = load8(gt + 2 * D + d), g3 = load8(gt + 3 * D + d);
        const v8 f = load8(ft + d);
        store8(gft + d, pt[0] * g0 + pt[1] * g1 + pt[2] * g2 + pt[3] * g3);
        acc[16] += f * g0; acc[17] += f * g1; acc[18] += f * g2; acc[19] += f * g3;
        for (int j = 0; j < 4; j++) {
            const v8 x = load8(xt + j * D + d);
            const float *c = ct + 4 * j;
            store8(gxt + j * D + d, c[0] * g0 + c[1] * g1 + c[2] * g2 + c[3] * g3);
            acc[4 * j] += x * g0; acc[4 * j + 1] += x * g1; acc[4 * j + 2] += x * g2; acc[4 * j + 3] += x * g3;
        }
    }
}

/* Given g = dL/dx', all four gradients of one token:
 *   gx_j = sum_k comb[j,k] g_k    gf = sum_k post_k g_k    gpost_k = f . g_k    gcomb[j,k] = x_j . g_k
 * n = 4 goes through write_bwd4; the loops below do any n, and the tail of D past a multiple of 8. */
static void write_bwd_token(const float *gt, const float *xt, const float *ft, const float *pt, const float *ct,
                            float *gxt, float *gft, float *gpt, float *gct, i64 n, i64 D) {
    i64 d0 = 0;
    if (n == 4) {
        v8 acc[20];
        d0 = D - D % V;
        write_bwd4(gt, xt, ft, pt, ct, gxt, gft, acc, D, d0);
        for (int i = 0; i < 16; i++) gct[i] = hsum8(acc[i]);
        for (int k = 0; k < 4; k++) gpt[k] = hsum8(acc[16 + k]);
    } else {
        for (i64 i = 0; i < n * n; i++) gct[i] = 0.f;
        for (i64 k = 0; k < n; k++) gpt[k] = 0.f;
    }
    const i64 R = D - d0;
    for (i64 k = 0; k < n; k++) gpt[k] += dot(ft + d0, gt + k * D + d0, R);
    for (i64 j = 0; j < n; j++)
        for (i64 k = 0; k < n; k++) gct[j * n + k] += dot(xt + j * D + d0, gt + k * D + d0, R);
#pragma omp simd
    for (i64 d = d0; d < D; d++) gft[d] = pt[0] * gt[d];
    for (i64 k = 1; k < n; k++) {
#pragma omp simd
        for (i64 d = d0; d < D; d++) gft[d] += pt[k] * gt[k * D + d];
    }
    for (i64 j = 0; j < n; j++) {
        float *gxj = gxt + j * D;
#pragma omp simd
        for (i64 d = d0; d < D; d++) gxj[d] = ct[j * n] * gt[d];
        for (i64 k = 1; k < n; k++) {
#pragma omp simd
            for (i64 d = d0; d < D; d++) gxj[d] += ct[j * n + k] * gt[k * D + d];
        }
    }
}

void hc_write_fwd(const float *x, const float *f, const float *post, const float *comb, float *out,
                  i64 N, i64 n, i64 D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N >= PAR_MIN_TOKENS)
    for (i64 t = 0; t < N; t++) {
        const float *xt = x + t * n * D, *ft = f + t * D, *ct = comb + t * n * n, *pt = post + t * n;
        float *ot = out + t * n * D;
        const i64 d0 = n == 4 ? D - D % V : 0;  /* n = 4: write_fwd4 up to d0, the loops below after it */
        if (n == 4) write_fwd4(xt, ft, pt, ct, ot, D, d0);
        for (i64 k = 0; k < n; k++) {
            float *o = ot + k * D;
#pragma omp simd
            for (i64 d = d0; d < D; d++) o[d] = pt[k] * ft[d];
            for (i64 j = 0; j < n; j++) {
                const float c = ct[j * n + k], *xj = xt + j * D;
#pragma omp simd
                for (i64 d = d0; d < D; d++) o[d] += c * xj[d];
            }
        }
    }
}

void hc_write_bwd(const float *g, const float *x, const float *f, const float *post, const float *comb,
                  float *gx, float *gf, float *gpost, float *gcomb, i64 N, i64 n, i64 D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N >= PAR_MIN_TOKENS)
    for (i64 t = 0; t < N; t++) {
        const i64 o = t * n * D;
        write_bwd_token(g + o, x + o, f + t * D, post + t * n, comb + t * n * n, gx + o, gf + t * D,
                        gpost + t * n, gcomb + t * n * n, n, D);
    }
}

/* ------------------------------------------------------------------ coefficients */
/* Every token runs the same few hundred scalar operations (sigmoids, a softmax, 2 * iters - 1
 * normalisations of an (n, n) matrix, each with n divisions in a dependent chain), so they are done
 * for L tokens at once, lanes innermost ([element][lane]), and the lane loops vectorise; one token
 * at a time the chain of divisions made the forward 2.6 ms and the backward 5.5 ms at N = 2048. */
#define L 16

static inline i64 sinkhorn_steps(i64 iters) { return iters > 0 ? 2 * iters - 1 : 0; }
/* The Sinkhorn steps: columns (axis 0: c[:, k] / (sum_j c[j, k] + eps)), then (iters - 1) x (rows, columns). */
static inline int step_axis(i64 s) { return s % 2 == 0 ? 0 : 1; }
static inline i64 at(i64 a, i64 b, i64 n, int axis) { return axis == 0 ? b * n + a : a * n + b; }

/* One thread's scratch for a block of L tokens, lanes innermost: z (M), pre, post (n), sm (n^2),
 * cs ((steps + 1) n^2), dens (steps n), g, g2 (n^2). */
typedef struct {
    float *z, *pre, *post, *sm, *cs, *dens, *g, *g2;
} Scratch;

static i64 scratch_floats(i64 n, i64 iters) {
    const i64 steps = sinkhorn_steps(iters);
    return L * ((2 + n) * n + 2 * n + n * n + (steps + 1) * n * n + steps * n + 2 * n * n);
}

static Scratch carve(float *buf, i64 n, i64 iters) {
    const i64 steps = sinkhorn_steps(iters);
    Scratch s;
    s.z = buf;
    s.pre = s.z + (2 + n) * n * L;
    s.post = s.pre + n * L;
    s.sm = s.post + n * L;
    s.cs = s.sm + n * n * L;
    s.dens = s.cs + (steps + 1) * n * n * L;
    s.g = s.dens + steps * n * L;
    s.g2 = s.g + n * n * L;
    return s;
}

/* For tokens t0 .. t0 + nb - 1 (nb <= L; missing lanes compute on zeros and are never stored): the
 * logits z = mixes * scale + base (mixes = raw * r) and what V4 derives from them: pre, post, the
 * row softmax sm, and the Sinkhorn states cs (the softmax + eps, then each step's output) with each
 * step's denominators, which the backward reuses. */
static void block_coefficients(const float *raw, const float *r, i64 nb, const float *base, const float *scale,
                               i64 n, i64 iters, float hc_eps, int head, float *z, float *pre, float *post,
                               float *sm, float *cs, float *dens) {
    const i64 M = head ? n : (2 + n) * n;
    for (i64 m = 0; m < M; m++) {
        const float s = head ? scale[0] : scale[m < n ? 0 : (m < 2 * n ? 1 : 2)], b = base[m];
        for (i64 l = 0; l < L; l++) z[m * L + l] = (l < nb ? raw[l * M + m] * r[l] : 0.f) * s + b;
    }
    for (i64 i = 0; i < n * L; i++) pre[i] = sigmoid(z[i]) + hc_eps;
    if (head) return;
    for (i64 i = 0; i < n * L; i++) post[i] = 2.f * sigmoid(z[n * L + i]);
    const float *zc = z + 2 * n * L;
    for (i64 j = 0; j < n; j++) {
        float mx[L], sum[L];
        for (i64 l = 0; l < L; l++) mx[l] = zc[j * n * L + l];
        for (i64 k = 1; k < n; k++)
#pragma omp simd
            for (i64 l = 0; l < L; l++) mx[l] = mx[l] >= zc[(j * n + k) * L + l] ? mx[l] : zc[(j * n + k) * L + l];
        for (i64 l = 0; l < L; l++) sum[l] = 0.f;
        for (i64 k = 0; k < n; k++)
            for (i64 l = 0; l < L; l++) sum[l] += (sm[(j * n + k) * L + l] = expf(zc[(j * n + k) * L + l] - mx[l]));
        for (i64 k = 0; k < n; k++)
#pragma omp simd
            for (i64 l = 0; l < L; l++) {
                const i64 i = (j * n + k) * L + l;
                sm[i] /= sum[l];
                cs[i] = sm[i] + hc_eps;
            }
    }
    for (i64 s = 0; s < sinkhorn_steps(iters); s++) {
        const float *in = cs + s * n * n * L;
        float *out = cs + (s + 1) * n * n * L, *den = dens + s * n * L;
        const int axis = step_axis(s);
        for (i64 a = 0; a < n; a++) {
            float acc[L];
#pragma omp simd
            for (i64 l = 0; l < L; l++) acc[l] = in[at(a, 0, n, axis) * L + l];
            for (i64 b = 1; b < n; b++)
#pragma omp simd
                for (i64 l = 0; l < L; l++) acc[l] += in[at(a, b, n, axis) * L + l];
#pragma omp simd
            for (i64 l = 0; l < L; l++) den[a * L + l] = acc[l] + hc_eps;
            for (i64 b = 0; b < n; b++)
#pragma omp simd
                for (i64 l = 0; l < L; l++) out[at(a, b, n, axis) * L + l] = in[at(a, b, n, axis) * L + l] / den[a * L + l];
        }
    }
}

/* pre (N, n), and unless head: post (N, n), comb (N, n, n). head: the HyperHead's M = n weights.
 * Returns 1 if the scratch (allocated here, before the threads start) could not be. */
int hc_coeffs_fwd(const float *raw, const float *r, const float *base, const float *scale, float *pre,
                  float *post, float *comb, i64 N, i64 n, i64 iters, float hc_eps, int head, int nt) {
    const i64 M = head ? n : (2 + n) * n, steps = sinkhorn_steps(iters), blocks = (N + L - 1) / L;
    const i64 F = scratch_floats(n, iters);
    float *buf = malloc(sizeof(float) * F * nt);
    if (!buf) return 1;
#pragma omp parallel num_threads(nt) if (N >= PAR_MIN_TOKENS)
    {
        const Scratch sc = carve(buf + omp_get_thread_num() * F, n, iters);
        const float *c = sc.cs + steps * n * n * L;
#pragma omp for schedule(static)
        for (i64 blk = 0; blk < blocks; blk++) {
            const i64 t0 = blk * L, nb = N - t0 < L ? N - t0 : L;
            block_coefficients(raw + t0 * M, r + t0, nb, base, scale, n, iters, hc_eps, head, sc.z, sc.pre, sc.post,
                               sc.sm, sc.cs, sc.dens);
            for (i64 l = 0; l < nb; l++) {
                const i64 t = t0 + l;
                for (i64 j = 0; j < n; j++) pre[t * n + j] = sc.pre[j * L + l];
                if (head) continue;
                for (i64 j = 0; j < n; j++) post[t * n + j] = sc.post[j * L + l];
                for (i64 i = 0; i < n * n; i++) comb[t * n * n + i] = c[i * L + l];
            }
        }
    }
    free(buf);
    return 0;
}

/* gz (N, M): dL/dz for the logits z = mixes * scale + base, given the gradients of pre, post and
 * comb; the forward is recomputed (a few hundred flops per token) rather than stored.
 * A Sinkhorn step c' = c / (sum_axis c + eps) backpropagates as g = (g' - sum_axis(g' c')) / den,
 * the row softmax as dz = sm * (g - sum_k g sm). */
int hc_coeffs_bwd(const float *raw, const float *r, const float *base, const float *scale, const float *gpre,
                  const float *gpost, const float *gcomb, float *gz, i64 N, i64 n, i64 iters, float hc_eps,
                  int head, int nt) {
    const i64 M = head ? n : (2 + n) * n, steps = sinkhorn_steps(iters), blocks = (N + L - 1) / L;
    const i64 F = scratch_floats(n, iters);
    float *buf = malloc(sizeof(float) * F * nt);
    if (!buf) return 1;
#pragma omp parallel num_threads(nt) if (N >= PAR_MIN_TOKENS)
    {
        const Scratch sc = carve(buf + omp_get_thread_num() * F, n, iters);
        const float *pr = sc.pre, *po = sc.post, *sm = sc.sm, *cs = sc.cs, *dens = sc.dens;
#pragma omp for schedule(static)
        for (i64 blk = 0; blk < blocks; blk++) {
            const i64 t0 = blk * L, nb = N - t0 < L ? N - t0 : L;
            block_coefficients(raw + t0 * M, r + t0, nb, base, scale, n, iters, hc_eps, head, sc.z, sc.pre, sc.post,
                               sc.sm, sc.cs, sc.dens);
            float *gzb = sc.z, *g = sc.g, *g2 = sc.g2;  /* z is no longer needed: its rows become dL/dz */
            for (i64 j = 0; j < n; j++)
                for (i64 l = 0; l < L; l++) {
                    const float sg = pr[j * L + l] - hc_eps;
                    gzb[j * L + l] = (l < nb ? gpre[(t0 + l) * n + j] : 0.f) * sg * (1.f - sg);
                }
            if (!head) {
                for (i64 j = 0; j < n; j++)
                    for (i64 l = 0; l < L; l++) {
                        const float sg = 0.5f * po[j * L + l];
                        gzb[(n + j) * L + l] = (l < nb ? gpost[(t0 + l) * n + j] : 0.f) * 2.f * sg * (1.f - sg);
                    }
                for (i64 i = 0; i < n * n; i++)
                    for (i64 l = 0; l < L; l++) g[i * L + l] = l < nb ? gcomb[(t0 + l) * n * n + i] : 0.f;
                for (i64 s = steps - 1; s >= 0; s--) {
                    const float *out = cs + (s + 1) * n * n * L, *den = dens + s * n * L;
                    const int axis = step_axis(s);
                    for (i64 a = 0; a < n; a++) {
                        float acc[L];
#pragma omp simd
                        for (i64 l = 0; l < L; l++) acc[l] = g[at(a, 0, n, axis) * L + l] * out[at(a, 0, n, axis) * L + l];
                        for (i64 b = 1; b < n; b++)
#pragma omp simd
                            for (i64 l = 0; l < L; l++) acc[l] += g[at(a, b, n, axis) * L + l] * out[at(a, b, n, axis) * L + l];
                        for (i64 b = 0; b < n; b++)
#pragma omp simd
                            for (i64 l = 0; l < L; l++) {
                                const i64 i = at(a, b, n, axis) * L + l;
                                g2[i] = (g[i] - acc[l]) / den[a * L + l];
                            }
                    }
                    float *tmp = g; g = g2; g2 = tmp;
                }
                for (i64 j = 0; j < n; j++) {
                    float acc[L];
                    for (i64 l = 0; l < L; l++) acc[l] = 0.f;
                    for (i64 k = 0; k < n; k++)
#pragma omp simd
                        for (i64 l = 0; l < L; l++) acc[l] += g[(j * n + k) * L + l] * sm[(j * n + k) * L + l];
                    for (i64 k = 0; k < n; k++)
#pragma omp simd
                        for (i64 l = 0; l < L; l++) {
                            const i64 i = (j * n + k) * L + l;
                            gzb[(2 * n + j * n + k) * L + l] = sm[i] * (g[i] - acc[l]);
                        }
                }
            }
            for (i64 l = 0; l < nb; l++)
                for (i64 m = 0; m < M; m++) gz[(t0 + l) * M + m] = gzb[m * L + l];
        }
    }
    free(buf);
    return 0;
}
