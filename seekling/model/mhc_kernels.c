/* Fused CPU kernels for mHC's per-token stream arithmetic (seekling/model/mhc_kernels.py builds and
 * loads this file; seekling/model/mhc.py says what each quantity is).
 *
 * Why C: per token, mHC projects n streams of D floats to (2 + n) n logits, runs a 20-round
 * Sinkhorn on an (n, n) matrix and mixes the streams. PyTorch spends that as dozens of small ops,
 * each a pass over memory, a thin GEMM that packs the streams first, or a batched GEMM of 4x4
 * matrices; here the read is one pass over the tokens in each direction and the write another.
 *
 * Layout: every array is contiguous fp32, tokens first: x and mixed (N, n, D), f and y (N, D), pre
 * and post (N, n), comb (N, n, n) with comb[t, j, k] the weight of stream j in new stream k, raw
 * (N, M) the projection before its RMS scale r (N). Tokens are independent, and sums over tokens
 * (the parameters' gradients) run over fixed chunks in order, so the results have the same bits
 * whatever the thread count. Sums over D are vectorised: their rounding differs from PyTorch's
 * order by a few ulps, which the tests allow.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

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

/* ------------------------------------------------------------------ write: x'_k = mixed_k + post_k f */
/* The read has already mixed the streams, mixed_k = sum_j comb[j,k] x_j, while they were in its
 * cache, so the write only adds the sublayer's output, and its backward needs only the incoming
 * gradient g: dL/dmixed is g itself (no pass), gf = sum_k post_k g_k and gpost_k = f . g_k.
 * The sublayer's output f arrives in fp32 or, under bf16 autocast, in bf16 (fbf): read as such, and
 * its gradient returned in the same dtype, rounded to nearest even as PyTorch's cast rounds, so
 * that no (N, D) fp32 copy of f or of its gradient is made. */
static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays a (quiet) NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* VW floats per vector: AVX-512's 16 where the compiler targets it, else AVX2's 8; TB tokens per
 * tile of the projection's forward product (below). */
#if defined(__AVX512F__)
#define VW 16
#define TB 4
#else
#define VW 8
#define TB 2
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
static inline vf ldv(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
static inline void stv(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
static inline float hsumv(vf v) {
    float s = 0.f;
    for (int l = 0; l < VW; l++) s += v[l];
    return s;
}
/* VW bf16 values widened to fp32 (exact: the bf16 bits are the float's top half). */
static inline vf ldv_bf16(const uint16_t *p) {
    vf v;
    for (int l = 0; l < VW; l++) v[l] = from_bf16(p[l]);
    return v;
}

/* A store that bypasses the cache, for the (N, n, D) outputs that the next op reads only after the
 * sublayer in between has been through the cache: a plain store first reads each line it writes
 * (another 8 MB of reads per stream tensor at 2048 tokens, n = 4, D = 256) and evicts data the
 * kernel still uses. Measured at that size, 1 thread of the 2-core Zen 5 EPYC: the read forward
 * -0.3 ms and its backward -0.6 ms per HyperConnection. Aligned vectors only (torch's buffers are
 * 64-byte aligned, and so is every slice of a stream when D is a multiple of VW); other stores are
 * plain. Such stores are weakly ordered: each thread fences them (store_fence) before its results
 * are handed on. */
static inline void stv_nt(float *p, vf v) {
#if defined(__AVX512F__)
    if (((uintptr_t)p & 63) == 0) {
        _mm512_stream_ps(p, (__m512)v);
        return;
    }
#elif defined(__AVX__)
    if (((uintptr_t)p & 31) == 0) {
        _mm256_stream_ps(p, (__m256)v);
        return;
    }
#endif
    stv(p, v);
}
static inline void store_fence(void) {
#if defined(__AVX__)
    _mm_sfence();
#endif
}

void hc_write_fwd(const float *mixed, const float *f, const uint16_t *fbf, const float *post, float *out, i64 N, i64 n,
                  i64 D, int nt) {
#pragma omp parallel num_threads(nt) if (N >= PAR_MIN_TOKENS)
    {
#pragma omp for schedule(static)
    for (i64 t = 0; t < N; t++) {
        for (i64 k = 0; k < n; k++) {
            const float p = post[t * n + k], *m = mixed + (t * n + k) * D;
            float *o = out + (t * n + k) * D;
            if (D % VW == 0) {
                for (i64 d = 0; d < D; d += VW)
                    stv_nt(o + d, ldv(m + d) + p * (fbf ? ldv_bf16(fbf + t * D + d) : ldv(f + t * D + d)));
            } else if (fbf) {
                const uint16_t *ft = fbf + t * D;
#pragma omp simd
                for (i64 d = 0; d < D; d++) o[d] = m[d] + p * from_bf16(ft[d]);
            } else {
                const float *ft = f + t * D;
#pragma omp simd
                for (i64 d = 0; d < D; d++) o[d] = m[d] + p * ft[d];
            }
        }
    }
    store_fence();
    }
}

/* VW fp32 values rounded to bf16 as to_bf16 rounds them (to nearest even, NaN kept a quiet NaN), on
 * integer vectors so that it vectorises on any AVX level. With AVX-512 the 16 results are gathered
 * into the low half of the register (vpermw) and stored from there: left to the compiler, the
 * narrowing became vpmovdw to memory, microcoded on AMD's Zen 4 and 5, which made the write's
 * backward 30x slower (5.7 ms at 2048 tokens, D = 256, 1 thread of the 2-core Zen 5 EPYC). */
typedef uint32_t vu __attribute__((vector_size(VW * sizeof(uint32_t))));
static inline void stv_bf16(uint16_t *p, vf v) {
    vu u;
    __builtin_memcpy(&u, &v, sizeof u);
    const vu nan = (u & 0x7fffffffu) > 0x7f800000u;  /* all ones where NaN */
    const vu h = (nan & ((u >> 16) | 0x40u)) | (~nan & ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
#if defined(__AVX512BW__) && VW == 16
    const __m512i lo = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    _mm256_storeu_si256((__m256i *)p, _mm512_castsi512_si256(_mm512_permutexvar_epi16(lo, (__m512i)h)));
#else
    for (int l = 0; l < VW; l++) p[l] = (uint16_t)h[l];
#endif
}

/* Chunks of CW floats of a token: f (converted from bf16 where it is) and the gradient of f are
 * built in arrays small enough for registers and L1, so the loops over them vectorise plainly
 * (widths that are not a multiple of VW; the others take the vector loop). */
#define CW 64

void hc_write_bwd(const float *g, const float *f, const uint16_t *fbf, const float *post, float *gf, uint16_t *gfbf,
                  float *gpost, i64 N, i64 n, i64 D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N >= PAR_MIN_TOKENS)
    for (i64 t = 0; t < N; t++) {
        const float *gt = g + t * n * D, *pt = post + t * n;
        if (n == 4 && D % VW == 0) {
            /* One pass over the token's four gradient slices, vector by vector: 0.15-0.19 ms at 2048
             * tokens, D = 256, where the chunked loops below took 0.37-0.50 ms (1 thread, Zen 5). */
            vf s0 = (vf){0}, s1 = (vf){0}, s2 = (vf){0}, s3 = (vf){0};
            for (i64 d = 0; d < D; d += VW) {
                const vf fv = fbf ? ldv_bf16(fbf + t * D + d) : ldv(f + t * D + d);
                const vf g0 = ldv(gt + d), g1 = ldv(gt + D + d), g2 = ldv(gt + 2 * D + d), g3 = ldv(gt + 3 * D + d);
                s0 += fv * g0; s1 += fv * g1; s2 += fv * g2; s3 += fv * g3;
                const vf a = pt[0] * g0 + pt[1] * g1 + pt[2] * g2 + pt[3] * g3;
                if (gfbf)
                    stv_bf16(gfbf + t * D + d, a);
                else
                    stv(gf + t * D + d, a);
            }
            gpost[t * n] = hsumv(s0); gpost[t * n + 1] = hsumv(s1);
            gpost[t * n + 2] = hsumv(s2); gpost[t * n + 3] = hsumv(s3);
            continue;
        }
        for (i64 k = 0; k < n; k++) gpost[t * n + k] = 0.f;
        for (i64 d0 = 0; d0 < D; d0 += CW) {
            const i64 w = D - d0 < CW ? D - d0 : CW;
            float fc[CW], a[CW];
            if (fbf)
                for (i64 d = 0; d < w; d++) fc[d] = from_bf16(fbf[t * D + d0 + d]);
            else
                for (i64 d = 0; d < w; d++) fc[d] = f[t * D + d0 + d];
            for (i64 d = 0; d < w; d++) a[d] = pt[0] * gt[d0 + d];
            for (i64 k = 1; k < n; k++)
                for (i64 d = 0; d < w; d++) a[d] += pt[k] * gt[k * D + d0 + d];
            for (i64 k = 0; k < n; k++) gpost[t * n + k] += dot(fc, gt + k * D + d0, w);
            if (gfbf)
                for (i64 d = 0; d < w; d++) gfbf[t * D + d0 + d] = to_bf16(a[d]);
            else
                for (i64 d = 0; d < w; d++) gf[t * D + d0 + d] = a[d];
        }
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
/* Which of `scale` multiplies logit m: [0] the pre logits, [1] the post ones, [2] comb's; the head has one. */
static inline i64 scale_index(i64 m, i64 n, int head) { return head ? 0 : m < n ? 0 : m < 2 * n ? 1 : 2; }
static inline i64 at(i64 a, i64 b, i64 n, int axis) { return axis == 0 ? b * n + a : a * n + b; }

/* One thread's scratch for a block of L tokens, lanes innermost: z (M), pre, post (n), sm (n^2),
 * cs ((steps + 1) n^2), dens (steps n), g, g2 (n^2); then token-major for the backward's stream
 * pass: gpre (L n), graw (L M), coef (L), gcomb and comb (L n^2). */
typedef struct {
    float *z, *pre, *post, *sm, *cs, *dens, *g, *g2, *gpre, *graw, *coef, *gcomb, *comb;
} Scratch;

static i64 scratch_floats(i64 n, i64 iters) {
    const i64 steps = sinkhorn_steps(iters), M = (2 + n) * n;
    return L * (M + 2 * n + n * n + (steps + 1) * n * n + steps * n + 2 * n * n + n + M + 1 + 2 * n * n);
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
    s.gpre = s.g2 + n * n * L;
    s.graw = s.gpre + n * L;
    s.coef = s.graw + (2 + n) * n * L;
    s.gcomb = s.coef + L;
    s.comb = s.gcomb + n * n * L;
    return s;
}

/* One Sinkhorn step for a block's L tokens: each column (axis 0) or row (axis 1) of in divided by its
 * sum + eps into out, the n denominators into den. Inlined with n = 4 and the axis as constants (the
 * callers' branches), the loops unroll and every index is folded; computed at run time, they cost
 * the read 0.2 ms forward and 0.45 ms backward per HyperConnection (2048 tokens, Zen 5). */
static inline __attribute__((always_inline)) void sinkhorn_step(const float *in, float *out, float *den, const i64 n,
                                                                const int axis, const float hc_eps) {
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

/* The backward of that step: the gradient g2 of its input from its output's g, (g - sum_axis(g out)) / den. */
static inline __attribute__((always_inline)) void sinkhorn_step_bwd(const float *g, const float *out, const float *den,
                                                                    float *g2, const i64 n, const int axis) {
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
        const float s = scale[scale_index(m, n, head)], b = base[m];
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
        if (n != 4)
            sinkhorn_step(in, out, den, n, step_axis(s), hc_eps);
        else if (step_axis(s) == 0)
            sinkhorn_step(in, out, den, 4, 0, hc_eps);
        else
            sinkhorn_step(in, out, den, 4, 1, hc_eps);
    }
}

/* dL/dz for the block (into the scratch's z rows, lanes innermost), given the gradients of pre
 * (gpre, the block's nb x n, token-major), post and comb (the block's rows of the (N, n) and (N, n, n)
 * arrays); the forward is recomputed (a few hundred flops per token) rather than stored. A Sinkhorn
 * step c' = c / (sum_axis c + eps) backpropagates as g = (g' - sum_axis(g' c')) / den, the row
 * softmax as dz = sm * (g - sum_k g sm). */
static void block_coefficients_bwd(const float *raw, const float *r, i64 nb, const float *base, const float *scale,
                                   i64 n, i64 iters, float hc_eps, int head, const float *gpre, const float *gpost,
                                   const float *gcomb, Scratch sc) {
    const i64 steps = sinkhorn_steps(iters);
    block_coefficients(raw, r, nb, base, scale, n, iters, hc_eps, head, sc.z, sc.pre, sc.post, sc.sm, sc.cs, sc.dens);
    const float *pr = sc.pre, *po = sc.post, *sm = sc.sm, *cs = sc.cs, *dens = sc.dens;
    float *gzb = sc.z, *g = sc.g, *g2 = sc.g2;  /* z is no longer needed: its rows become dL/dz */
    for (i64 j = 0; j < n; j++)
        for (i64 l = 0; l < L; l++) {
            const float sg = pr[j * L + l] - hc_eps;
            gzb[j * L + l] = (l < nb ? gpre[l * n + j] : 0.f) * sg * (1.f - sg);
        }
    if (head) return;
    for (i64 j = 0; j < n; j++)
        for (i64 l = 0; l < L; l++) {
            const float sg = 0.5f * po[j * L + l];
            gzb[(n + j) * L + l] = (l < nb ? gpost[l * n + j] : 0.f) * 2.f * sg * (1.f - sg);
        }
    for (i64 i = 0; i < n * n; i++)
        for (i64 l = 0; l < L; l++) g[i * L + l] = l < nb ? gcomb[l * n * n + i] : 0.f;
    for (i64 s = steps - 1; s >= 0; s--) {
        const float *out = cs + (s + 1) * n * n * L, *den = dens + s * n * L;
        if (n != 4)
            sinkhorn_step_bwd(g, out, den, g2, n, step_axis(s));
        else if (step_axis(s) == 0)
            sinkhorn_step_bwd(g, out, den, g2, 4, 0);
        else
            sinkhorn_step_bwd(g, out, den, g2, 4, 1);
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

/* ------------------------------------------------------------------ the projection's products */
/* The three products of the projection (raw = x fn^T forward; g_raw fn and g_raw^T x backward) are
 * thin: M = (2 + n) n = 24 rows of fn against K = n D = 1024 floats per token. A BLAS packs the
 * token matrix into its panel layout for each of them, an extra pass over the streams; here they
 * run inside the block loops while the block's streams are in cache, on register tiles (TB tokens
 * x 6 rows of fn forward; GT, GM, GC below for the backward), and the streams are read once per
 * direction. Measured at N = 2048, 1 thread of a 2-core AMD EPYC (Zen 5): the whole read forward
 * 2.0 ms and backward 3.2 ms against 3.6 and 6.9 ms with MKL's GEMMs and separate passes (MKL alone:
 * 2.1, 1.9 and 2.1 ms for the three products). */

/* The backward's two products on register tiles of GT tokens x GC vectors of the streams' gradient
 * and of GM rows x GC vectors of fn's: each loaded vector feeds GT (or GM) multiply-adds, so the
 * loops run at the multiply-add rate instead of waiting on loads. */
#if defined(__AVX512F__)
#define GT 4
#define GM 6
#else
#define GT 2
#define GM 2
#endif
#define GC 4

/* The backward's products walk fn and the block's streams in panels of PW columns. Row-major, the
 * 24 rows of fn (or a block's 16 tokens of x) lie 4 KB apart when n D = 1024: all of them fall in
 * the same sets of the L1 cache, which holds 8 (Zen 3) or 12 (Zen 5) lines per set, and the loops
 * that revisit them for every token tile (fn) or row tile (x) found them in L2. The backward copies
 * fn once per call into panels (panel p: columns p .. p + PW of every row, row after row: 3 KB for
 * n = 4, D = 256 with AVX2) and a block's columns of x, panel by panel, into a 2 KB array, which
 * then stay in L1 while they are used; fn's gradient is summed in panels too, and put back in rows
 * once at the end. The forward keeps fn row-major: it reads six rows at a time from start to end,
 * sequential streams that the hardware prefetcher follows, and panels measured slower there (5.4 ->
 * 6.9 ms). Measured in the read's backward at 2048 tokens, 1 thread of a 2-core AMD EPYC Zen 3
 * (AVX2), the old and the new build alternating in one process, caches flushed before each call:
 * 13.7 -> 10.5 ms with the panels and the prefetches below (without the flush 15.2 -> 11.6). */
#define PW (GC * VW)
/* rows (M, K) -> panels, and back; K a multiple of PW (the tiled paths, the only users, need it). */
static void to_panels(const float *rows, float *panels, i64 M, i64 K) {
    for (i64 p = 0; p < K; p += PW)
        for (i64 m = 0; m < M; m++)
            for (i64 c = 0; c < PW; c++) panels[p * M + m * PW + c] = rows[m * K + p + c];
}
static void from_panels(const float *panels, float *rows, i64 M, i64 K) {
    for (i64 p = 0; p < K; p += PW)
        for (i64 m = 0; m < M; m++)
            for (i64 c = 0; c < PW; c++) rows[m * K + p + c] = panels[p * M + m * PW + c];
}

/* raw[l, m .. m + 6] = x_l . fn_m for tb tokens (tb = TB or 1, a constant where inlined), or each of
 * the last rows from m when fewer than 6 are left; K a multiple of VW. */
static inline __attribute__((always_inline)) void project_tile(const float *x, const float *fn, float *raw, i64 M,
                                                               i64 K, i64 m, const int tb) {
    if (m + 6 <= M) {
        vf a[TB][6];
        for (int i = 0; i < tb; i++)
            for (int j = 0; j < 6; j++) a[i][j] = (vf){0};
        for (i64 k = 0; k < K; k += VW) {
            vf xv[TB];
            for (int i = 0; i < tb; i++) xv[i] = ldv(x + i * K + k);
            for (int j = 0; j < 6; j++) {
                const vf f = ldv(fn + (m + j) * K + k);
                for (int i = 0; i < tb; i++) a[i][j] += xv[i] * f;
            }
        }
        for (int i = 0; i < tb; i++)
            for (int j = 0; j < 6; j++) raw[i * M + m + j] = hsumv(a[i][j]);
        return;
    }
    for (; m < M; m++) {
        vf a[TB];
        for (int i = 0; i < tb; i++) a[i] = (vf){0};
        for (i64 k = 0; k < K; k += VW) {
            const vf f = ldv(fn + m * K + k);
            for (int i = 0; i < tb; i++) a[i] += ldv(x + i * K + k) * f;
        }
        for (int i = 0; i < tb; i++) raw[i * M + m] = hsumv(a[i]);
    }
}

/* raw (nb, M) = x (nb, K) fn^T for the tokens of one block. */
static void project(const float *x, const float *fn, float *raw, i64 nb, i64 M, i64 K) {
    if (K % VW) {
        for (i64 l = 0; l < nb; l++)
            for (i64 m = 0; m < M; m++) raw[l * M + m] = dot(x + l * K, fn + m * K, K);
        return;
    }
    for (i64 m = 0; m < M; m += 6) {  /* rows outer: a tile's rows of fn stay in cache across the block's tokens */
        i64 l = 0;
        for (; l + TB <= nb; l += TB) project_tile(x + l * K, fn, raw + l * M, M, K, m, TB);
        for (; l < nb; l++) project_tile(x + l * K, fn, raw + l * M, M, K, m, 1);
    }
}

/* gx_l,j = sum_m graw[l, m] fn_m + pre[l, j] gy_l + coef_l x_l,j + sum_k comb[l, j, k] gm_l,k for tb
 * tokens (tb = GT or 1, a constant where inlined): the projection's, the read's, the RMS scale's and
 * the mixing's terms of the streams' gradient in one store (gm = dL/dmixed, NULL for the head,
 * which does not mix), fn in panels (fp). D a multiple of PW, so a tile never straddles two streams.
 * ahead: the same tokens of the next block exist, and the same columns of their x, gm and gy are
 * prefetched: the loads of a block's first pass (stream_dots4) then find them in cache rather than
 * waiting on memory while no arithmetic runs (0.7 ms of the gain above, measured without the flush). */
static inline __attribute__((always_inline)) void stream_grad_tile(const float *x, const float *gy, const float *gm,
                                                                   const float *pre, const float *comb,
                                                                   const float *graw, const float *coef,
                                                                   const float *fp, float *gx, i64 n, i64 D, i64 M,
                                                                   const int ahead, const int tb) {
    const i64 K = n * D;
    for (i64 k = 0; k < K; k += PW) {
        const i64 j = k / D, d = k - j * D;
        if (ahead)
            for (int i = 0; i < tb; i++)
                for (int c = 0; c < PW; c += 64 / (int)sizeof(float)) {  /* one 64-byte line each */
                    __builtin_prefetch(x + (L + i) * K + k + c, 0, 3);
                    if (gm) __builtin_prefetch(gm + (L + i) * K + k + c, 0, 3);
                    if (j == 0) __builtin_prefetch(gy + (L + i) * D + d + c, 0, 3);
                }
        vf a[GT][GC];
        for (int i = 0; i < tb; i++)
            for (int c = 0; c < GC; c++)
                a[i][c] = coef[i] * ldv(x + i * K + k + c * VW) + pre[i * n + j] * ldv(gy + i * D + d + c * VW);
        if (gm)
            for (int i = 0; i < tb; i++)
                for (i64 kk = 0; kk < n; kk++) {
                    const float w = comb[(i * n + j) * n + kk];
                    for (int c = 0; c < GC; c++) a[i][c] += w * ldv(gm + i * K + kk * D + d + c * VW);
                }
        for (i64 m = 0; m < M; m++) {
            vf f[GC];
            for (int c = 0; c < GC; c++) f[c] = ldv(fp + k * M + m * PW + c * VW);
            for (int i = 0; i < tb; i++) {
                const float g = graw[i * M + m];
                for (int c = 0; c < GC; c++) a[i][c] += g * f[c];
            }
        }
        for (int i = 0; i < tb; i++)
            for (int c = 0; c < GC; c++) stv_nt(gx + i * K + k + c * VW, a[i][c]);
    }
}

/* next: how many tokens the next block has (0: none). */
static void stream_grad(const float *x, const float *gy, const float *gm, const float *pre, const float *comb,
                        const float *graw, const float *coef, const float *fn, const float *fp, float *gx, i64 nb,
                        i64 n, i64 D, i64 M, i64 next) {
    const i64 K = n * D;
    if (D % PW) {
        for (i64 l = 0; l < nb; l++)
            for (i64 j = 0; j < n; j++) {
                const float c = coef[l], w = pre[l * n + j], *xj = x + l * K + j * D, *gyl = gy + l * D;
                float *g = gx + l * K + j * D;
#pragma omp simd
                for (i64 d = 0; d < D; d++) g[d] = c * xj[d] + w * gyl[d];
                for (i64 k = 0; gm && k < n; k++) {
                    const float a = comb[(l * n + j) * n + k], *gk = gm + l * K + k * D;
#pragma omp simd
                    for (i64 d = 0; d < D; d++) g[d] += a * gk[d];
                }
                for (i64 m = 0; m < M; m++) {
                    const float a = graw[l * M + m], *f = fn + m * K + j * D;
#pragma omp simd
                    for (i64 d = 0; d < D; d++) g[d] += a * f[d];
                }
            }
        return;
    }
    i64 l = 0;
    for (; l + GT <= nb; l += GT)
        stream_grad_tile(x + l * K, gy + l * D, gm ? gm + l * K : 0, pre + l * n, comb + l * n * n, graw + l * M,
                         coef + l, fp, gx + l * K, n, D, M, l + GT <= next, GT);
    for (; l < nb; l++)
        stream_grad_tile(x + l * K, gy + l * D, gm ? gm + l * K : 0, pre + l * n, comb + l * n * n, graw + l * M,
                         coef + l, fp, gx + l * K, n, D, M, l + 1 <= next, 1);
}

/* gfn[m] += sum_l graw[l, m] x_l for mb rows (mb = GM or 1) and the PW columns from k, tokens in
 * order; xp holds the block's tokens' x in those columns, PW floats per token, and gfn is in panels
 * like fp. */
static inline __attribute__((always_inline)) void fn_grad_tile(const float *xp, const float *graw, float *gfn, i64 nb,
                                                               i64 M, i64 m, i64 k, const int mb) {
    vf a[GM][GC];
    for (int i = 0; i < mb; i++)
        for (int c = 0; c < GC; c++) a[i][c] = ldv(gfn + k * M + (m + i) * PW + c * VW);
    for (i64 l = 0; l < nb; l++) {
        vf xv[GC];
        for (int c = 0; c < GC; c++) xv[c] = ldv(xp + l * PW + c * VW);
        for (int i = 0; i < mb; i++) {
            const float g = graw[l * M + m + i];
            for (int c = 0; c < GC; c++) a[i][c] += g * xv[c];
        }
    }
    for (int i = 0; i < mb; i++)
        for (int c = 0; c < GC; c++) stv(gfn + k * M + (m + i) * PW + c * VW, a[i][c]);
}

/* gfn (M, K) += graw^T x over the nb tokens of a block: in panels where K is a multiple of PW (the
 * backward puts the total back in rows), else row-major. */
static void fn_grad(const float *x, const float *graw, float *gfn, i64 nb, i64 M, i64 K) {
    if (K % PW) {
        for (i64 l = 0; l < nb; l++)
            for (i64 m = 0; m < M; m++) {
                const float a = graw[l * M + m], *xl = x + l * K;
                float *g = gfn + m * K;
#pragma omp simd
                for (i64 k = 0; k < K; k++) g[k] += a * xl[k];
            }
        return;
    }
    for (i64 k = 0; k < K; k += PW) {
        float xp[L * PW];
        for (i64 l = 0; l < nb; l++)
            for (int c = 0; c < PW; c += VW) stv(xp + l * PW + c, ldv(x + l * K + k + c));
        i64 m = 0;
        for (; m + GM <= M; m += GM) fn_grad_tile(xp, graw, gfn, nb, M, m, k, GM);
        for (; m < M; m++) fn_grad_tile(xp, graw, gfn, nb, M, m, k, 1);
    }
}

/* ------------------------------------------------------------------ read: x -> y and the coefficients */

/* n = 4 (V4's hc_mult), D a multiple of VW: y = sum_j w_j x_j and mixed_k = sum_j c[j,k] x_j for
 * one token from registers, each slice of the four streams loaded once (the loops of mix_token
 * below pass over the token n^2 times: 1.5 ms per HyperConnection at 2048 tokens). */
static void read_mix4(const float *xt, const float *w, const float *c, float *yt, float *mt, i64 D) {
    for (i64 d = 0; d < D; d += VW) {
        const vf x0 = ldv(xt + d), x1 = ldv(xt + D + d), x2 = ldv(xt + 2 * D + d), x3 = ldv(xt + 3 * D + d);
        stv(yt + d, w[0] * x0 + w[1] * x1 + w[2] * x2 + w[3] * x3);
        for (int k = 0; k < 4; k++) stv_nt(mt + k * D + d, c[k] * x0 + c[4 + k] * x1 + c[8 + k] * x2 + c[12 + k] * x3);
    }
}

/* gpre_j = x_j . gy and gcomb[j,k] = x_j . gm_k for one token, n = 4, D a multiple of VW: the 20 dot
 * products in 20 vector accumulators, each slice loaded once. */
static void stream_dots4(const float *xt, const float *gyt, const float *gmt, float *gpre, float *gcomb, i64 D) {
    vf a[20];
    for (int i = 0; i < 20; i++) a[i] = (vf){0};
    for (i64 d = 0; d < D; d += VW) {
        const vf gy = ldv(gyt + d), g0 = ldv(gmt + d), g1 = ldv(gmt + D + d), g2 = ldv(gmt + 2 * D + d),
                 g3 = ldv(gmt + 3 * D + d);
        for (int j = 0; j < 4; j++) {
            const vf xj = ldv(xt + j * D + d);
            a[16 + j] += xj * gy;
            a[4 * j] += xj * g0; a[4 * j + 1] += xj * g1; a[4 * j + 2] += xj * g2; a[4 * j + 3] += xj * g3;
        }
    }
    for (int j = 0; j < 4; j++) gpre[j] = hsumv(a[16 + j]);
    for (int i = 0; i < 16; i++) gcomb[i] = hsumv(a[i]);
}

/* mixed_k = sum_j comb[j,k] x_j for one token: the streams the write carries over. */
static void mix_token(const float *xt, const float *ct, float *ot, i64 n, i64 D) {
    for (i64 k = 0; k < n; k++) {
        float *o = ot + k * D;
        const float c0 = ct[k];
#pragma omp simd
        for (i64 d = 0; d < D; d++) o[d] = c0 * xt[d];
        for (i64 j = 1; j < n; j++) {
            const float c = ct[j * n + k], *xj = xt + j * D;
#pragma omp simd
            for (i64 d = 0; d < D; d++) o[d] += c * xj[d];
        }
    }
}

/* Forward, per block of L tokens in one pass over its streams (which stay in cache): the RMS scale
 * r = (|x|^2 / K + norm_eps)^-1/2, raw = x fn^T, the coefficients pre and post (N, n) and comb, then
 * y = sum_j pre_j x_j and the mixed streams (N, n, D) that the write adds the sublayer's output to.
 * raw and r are kept for the backward, which recomputes comb. head: the HyperHead's M = n sigmoid
 * weights, y only. Returns 1 if the scratch (allocated here, before the threads
 * start, so that a failed allocation cannot leave a thread out of the worksharing loop) could not be. */
int hc_read_fwd(const float *x, const float *fn, const float *base, const float *scale, float *y, float *pre,
                float *post, float *mixed, float *raw, float *r, i64 N, i64 n, i64 D, i64 iters, float hc_eps,
                float norm_eps, int head, int nt) {
    const i64 M = head ? n : (2 + n) * n, K = n * D, steps = sinkhorn_steps(iters), blocks = (N + L - 1) / L;
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
            const float *xb = x + t0 * K;
            for (i64 l = 0; l < nb; l++) r[t0 + l] = 1.f / sqrtf(dot(xb + l * K, xb + l * K, K) / (float)K + norm_eps);
            project(xb, fn, raw + t0 * M, nb, M, K);
            block_coefficients(raw + t0 * M, r + t0, nb, base, scale, n, iters, hc_eps, head, sc.z, sc.pre, sc.post,
                               sc.sm, sc.cs, sc.dens);
            for (i64 l = 0; l < nb; l++) {
                const i64 t = t0 + l;
                for (i64 j = 0; j < n; j++) pre[t * n + j] = sc.pre[j * L + l];
                const float *xt = x + t * K, *wt = pre + t * n;
                float *yt = y + t * D, *ct = sc.comb + l * n * n;
                if (!head) {
                    for (i64 j = 0; j < n; j++) post[t * n + j] = sc.post[j * L + l];
                    for (i64 i = 0; i < n * n; i++) ct[i] = c[i * L + l];
                }
                if (!head && n == 4 && D % VW == 0) {
                    read_mix4(xt, wt, ct, yt, mixed + t * K, D);
                    continue;
                }
                if (!head) mix_token(xt, ct, mixed + t * K, n, D);
#pragma omp simd
                for (i64 d = 0; d < D; d++) yt[d] = wt[0] * xt[d];
                for (i64 j = 1; j < n; j++) {
                    const float wj = wt[j], *xj = xt + j * D;
#pragma omp simd
                    for (i64 d = 0; d < D; d++) yt[d] += wj * xj[d];
                }
            }
        }
        store_fence();
    }
    free(buf);
    return 0;
}

/* Tokens per partial sum of gfn: each chunk's sum runs over its tokens in order and the chunks are
 * added in order, so gfn has the same bits whatever the thread count. */
#define CHUNK 256

/* Backward, per block of L tokens in one pass: gpre = x_j . gy and gcomb[j,k] = x_j . gm_k (gm =
 * dL/dmixed, NULL for the head), the coefficients' backward (dL/dz
 * for the logits z = raw r scale + base), the projection's gradient graw = dz scale r and the RMS
 * scale's coef = -r^3 / K sum_m dz_m scale_m raw_m, then the streams' gradient gx (N, n, D) in one
 * store and this chunk's parts of the parameters' gradients: fn's (M, K), and per logit base's (dz)
 * and scale's (dz raw r), 2M floats (kept per logit: one fp32 sum per scale over all of a chunk's
 * logits lost enough precision to miss the tests' 2e-5 for the head). parts holds ceil(N / CHUNK)
 * zeroed runs of M K + 2 M floats; their total is left in the first. Returns 1 if the scratch could not be allocated. */
int hc_read_bwd(const float *x, const float *fn, const float *base, const float *scale, const float *pre,
                const float *raw, const float *r, const float *gy, const float *gm, const float *gpost, float *gx,
                float *parts, i64 N, i64 n, i64 D, i64 iters, float hc_eps, int head, int nt) {
    const i64 M = head ? n : (2 + n) * n, K = n * D, P = M * K + 2 * M, chunks = (N + CHUNK - 1) / CHUNK;
    const i64 F = scratch_floats(n, iters);
    float *buf = malloc(sizeof(float) * (F * nt + M * K));  /* the threads' scratch, then fn in panels */
    if (!buf) return 1;
    float *fp = buf + F * nt;
    if (K % PW == 0) to_panels(fn, fp, M, K);
#pragma omp parallel num_threads(nt) if (N >= PAR_MIN_TOKENS)
    {
        const Scratch sc = carve(buf + omp_get_thread_num() * F, n, iters);
#pragma omp for schedule(static)
        for (i64 ch = 0; ch < chunks; ch++) {
            float *part = parts + ch * P, *gbase = part + M * K, *gscale = gbase + M;
            const i64 end = (ch + 1) * CHUNK < N ? (ch + 1) * CHUNK : N;
            for (i64 t0 = ch * CHUNK; t0 < end; t0 += L) {
                const i64 nb = end - t0 < L ? end - t0 : L;
                const float *xb = x + t0 * K, *gyb = gy + t0 * D, *gmb = head ? 0 : gm + t0 * K;
                for (i64 l = 0; l < nb; l++) {
                    if (gmb && n == 4 && D % VW == 0) {
                        stream_dots4(xb + l * K, gyb + l * D, gmb + l * K, sc.gpre + l * n, sc.gcomb + l * n * n, D);
                        continue;
                    }
                    for (i64 j = 0; j < n; j++) {
                        const float *xj = xb + l * K + j * D;
                        sc.gpre[l * n + j] = dot(xj, gyb + l * D, D);
                        for (i64 k = 0; gmb && k < n; k++)
                            sc.gcomb[(l * n + j) * n + k] = dot(xj, gmb + l * K + k * D, D);
                    }
                }
                block_coefficients_bwd(raw + t0 * M, r + t0, nb, base, scale, n, iters, hc_eps, head, sc.gpre,
                                       gpost + t0 * n, sc.gcomb, sc);
                if (!head) {  /* comb, recomputed by the backward above, token-major for the stream pass */
                    const float *c = sc.cs + sinkhorn_steps(iters) * n * n * L;
                    for (i64 l = 0; l < nb; l++)
                        for (i64 i = 0; i < n * n; i++) sc.comb[l * n * n + i] = c[i * L + l];
                }
                for (i64 l = 0; l < nb; l++) {
                    const float rl = r[t0 + l];
                    float acc = 0.f;
                    for (i64 m = 0; m < M; m++) {
                        const float gzm = sc.z[m * L + l], gmix = gzm * scale[scale_index(m, n, head)];
                        const float rw = raw[(t0 + l) * M + m];
                        gbase[m] += gzm;
                        gscale[m] += gzm * rw * rl;
                        sc.graw[l * M + m] = gmix * rl;
                        acc += gmix * rw;
                    }
                    sc.coef[l] = acc * rl * rl * rl / -(float)K;
                }
                const i64 next = end - t0 - nb < L ? end - t0 - nb : L;  /* this thread's next block, in this chunk */
                stream_grad(xb, gyb, gmb, pre + t0 * n, sc.comb, sc.graw, sc.coef, fn, fp, gx + t0 * K, nb, n, D, M, next);
                fn_grad(xb, sc.graw, part, nb, M, K);
            }
        }
        store_fence();
    }
    for (i64 ch = 1; ch < chunks; ch++) {
        const float *part = parts + ch * P;
#pragma omp simd
        for (i64 i = 0; i < P; i++) parts[i] += part[i];
    }
    if (K % PW == 0) {  /* fn's gradient was summed in panels: back to rows, through fp's space */
        from_panels(parts, fp, M, K);
        for (i64 i = 0; i < M * K; i++) parts[i] = fp[i];
    }
    free(buf);
    return 0;
}
