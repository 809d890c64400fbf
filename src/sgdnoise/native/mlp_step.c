/* A pack of plain MLPs (Linear, ReLU, ..., Linear; cross-entropy) trained by heavy-ball SGD
 * with L2: one optimizer step of every member in one call, member by member.
 *
 * Why this exists: at the small batch sizes of the noise-dominated regime a member's step
 * is a few matrix products with 4 to 64 rows. torch's batched kernels run those at a
 * quarter of the CPU's peak, and the gradient, the momentum and the update then stream
 * every weight through memory again. Here a member's forward pass, backward pass and
 * update run back to back while its weights are still in the caches; the products are
 * the register-blocked outer-product loop below (6 or 4 rows x 16 columns of
 * accumulators, 32 with AVX-512), the backward pass reads each row of weights once for the
 * input gradient, the weight gradient and the update, and the weight gradient is applied a block of 6 rows
 * at a time, as soon as it is summed, never stored whole. An output layer of 8 to 15
 * classes runs its backward pass along its input's width instead (linear_bwd_narrow_out).
 * sgdn_mlp_steps takes several steps per call.
 *
 * The math is that of sgdnoise.models.packed_mlp (and so of autograd and torch's fused
 * SGD): forward h_{l+1} = relu(h_l W_l + b_l), loss = mean over rows of
 * logsumexp(z) - z_y; backward g_L = (softmax(z) - onehot(y)) / n, dx = (g W^T) where the
 * layer's input is > 0, else 0; update grad = h^T g + wd W, v = m v + grad, W -= lr v
 * (m = 0: no buffer, W -= lr grad). Sums run in another order than torch's, so results
 * agree to float rounding, not to the bit.
 *
 * Layouts (all float32, C-contiguous): W_l (K, I_l, O_l), b_l (K, O_l), the same for the
 * momentum buffers; x (K, n, I_0); y (K, n) int64. The workspace (sgdn_mlp_ws_floats)
 * holds one member's activations and gradients at a time, in rows of `padded` length.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi8 __attribute__((vector_size(32), aligned(4), may_alias));
/* With AVX-512 (-march=native on a CPU that has it), the products and the update also run
 * on vectors of 16: twice the multiply-adds per instruction where the CPU executes them at
 * full width (AMD's Zen 5: 240 GFLOP/s a core against 120 with vectors of 8). Each of their
 * lanes computes what a lane of 8 did, in the same order, so the bits do not change. */
#if defined(__AVX512F__) && !defined(NO_WIDE)
#define WIDE 1
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4), may_alias));
#endif

#define LD(p) (*(const v8 *)(p))
#define ST(p, v) (*(v8 *)(p) = (v))

static inline v8 bc(float a) { return (v8){a, a, a, a, a, a, a, a}; }

static inline float hsum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#if WIDE
/* sum[r] = hsum(lo + hi) of each of four vectors of 16 D_r (lo, hi: their halves), the four
 * reduced together: the halves' lanes added (l + l + 8), then within each half as hsum
 * adds, (l + l + 4), then adjacent pairs, then the two pairs. */
static inline void dx_sums4(v16 D0, v16 D1, v16 D2, v16 D3, float *sum) {
    /* X = [lo0 + hi0 | lo1 + hi1], Y = the same of D2, D3 (blocks of 4 lanes: 0-3 4-7 ..). */
    v16 X = __builtin_shufflevector(D0, D1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                    22, 23) +
            __builtin_shufflevector(D0, D1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                    29, 30, 31);
    v16 Y = __builtin_shufflevector(D2, D3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                    22, 23) +
            __builtin_shufflevector(D2, D3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                    29, 30, 31);
    /* F: block r holds a_l = t_l + t_{l+4} of row r's t = lo + hi. */
    v16 F = __builtin_shufflevector(X, Y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                                    26, 27) +
            __builtin_shufflevector(X, Y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29,
                                    30, 31);
    /* (a0 + a1), (a2 + a3), then their sum, in lane 0 of each block. */
    v16 G = F + __builtin_shufflevector(F, F, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12,
                                        15, 14);
    v16 H = G + __builtin_shufflevector(G, G, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15,
                                        12, 13);
    sum[0] = H[0], sum[1] = H[4], sum[2] = H[8], sum[3] = H[12];
}
#endif

/* Keeps two vectors in registers at this point: the compiler may not fold their loads into
 * the instructions that use them (x86's vector registers; elsewhere nothing). */
#if defined(__AVX512F__)
#define IN_REGISTERS(a, b) __asm__("" : "+v"(a), "+v"(b))
#elif defined(__AVX__)
#define IN_REGISTERS(a, b) __asm__("" : "+x"(a), "+x"(b))
#else
#define IN_REGISTERS(a, b) ((void)0)
#endif

/* a * b + c rounded once. Written out where a sum must keep the order of another path's:
 * the compiler fuses a * b + c only where its tuning likes to (for AMD's Zen, not in a
 * loop-carried sum). */
static inline v8 fma8(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
#if WIDE
static inline v16 fma16(v16 a, v16 b, v16 c) {
    return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
static inline v16 bc16(float a) { return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
#endif


/* The micro-kernel: for MR rows m (row pointers a[m]; a short block repeats a row),
 * c[2m] += sum_k a[m][k*ak] * B[k*bk + 0..VW-1] and c[2m+1] += ... * B[k*bk + jb ..]
 * (vectors VT of VW floats): 2 MR accumulators in registers, each B row segment loaded once
 * for the MR rows. */
#define MICRO_KERNEL(MR, VT, SFX)                                                           \
    static inline void mk##MR##_##SFX(int kn, const float *const *a, ptrdiff_t ak,          \
                                      const float *B, ptrdiff_t bk, int jb, VT *c) {        \
        VT c0[MR], c1[MR];                                                                  \
        const float *ap[MR];                                                                \
        for (int m = 0; m < MR; m++) {                                                      \
            c0[m] = c[2 * m];                                                               \
            c1[m] = c[2 * m + 1];                                                           \
            ap[m] = a[m];                                                                   \
        }                                                                                   \
        for (int k = 0; k < kn; k++) {                                                      \
            const float *b = B + (ptrdiff_t)k * bk;                                         \
            VT b0 = *(const VT *)b, b1 = *(const VT *)(b + jb);                             \
            /* With 4 rows GCC folded these loads into each row's FMA (12 loads per 8        \
             * FMAs, bound by the loads). */                                                 \
            if (MR == 4) IN_REGISTERS(b0, b1);                                              \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) {                          \
                float x = ap[m][(ptrdiff_t)k * ak];                                         \
                c0[m] += x * b0;                                                            \
                c1[m] += x * b1;                                                            \
            }                                                                               \
        }                                                                                   \
        for (int m = 0; m < MR; m++) {                                                      \
            c[2 * m] = c0[m];                                                               \
            c[2 * m + 1] = c1[m];                                                           \
        }                                                                                   \
    }
MICRO_KERNEL(6, v8, 8)
MICRO_KERNEL(4, v8, 8)
#if WIDE
MICRO_KERNEL(6, v16, 16)
MICRO_KERNEL(4, v16, 16)
#endif

/* The micro-kernel for a product exactly one vector wide (with vectors of 16, a batch of
 * 16 rows as the columns of dx^T; vectors of 8 never meet one, since the blocked backward
 * pass takes more than 8 rows): c[m] += sum_k a[m][k*ak] * B[k*bk + 0..VW-1], each sum in
 * the order of MICRO_KERNEL's. Its two vectors would both cover these columns (strips of
 * two overlap), so that half its multiply-adds repeat the other half's. */
#define MICRO_KERNEL1(VT, SFX)                                                              \
    static inline void mk1_##SFX(int mr, int kn, const float *const *a, ptrdiff_t ak,        \
                                 const float *B, ptrdiff_t bk, VT *c) {                     \
        VT c0[6];                                                                           \
        const float *ap[6];                                                                 \
        for (int m = 0; m < 6; m++) {                                                       \
            c0[m] = m < mr ? c[m] : (VT){0};                                                \
            ap[m] = a[m < mr ? m : mr - 1];                                                 \
        }                                                                                   \
        for (int k = 0; k < kn; k++) {                                                      \
            VT b0 = *(const VT *)(B + (ptrdiff_t)k * bk);                                   \
            _Pragma("GCC unroll 6") for (int m = 0; m < 6; m++) {                           \
                float x = ap[m][(ptrdiff_t)k * ak];                                         \
                c0[m] += x * b0;                                                            \
            }                                                                               \
        }                                                                                   \
        for (int m = 0; m < mr; m++) c[m] = c0[m];                                          \
    }
MICRO_KERNEL1(v8, 8)
#if WIDE
MICRO_KERNEL1(v16, 16)
#endif

/* Row blocks: 6 rows while more than 4 remain, else 4 (a short block repeats its last row). */
static inline int block_rows(int left) { return left > 4 ? 6 : 4; }

/* A forward pass's rows [0, n6) run in blocks of 6, the rest in blocks of 4: a remainder of
 * 1 or 2 rows takes two blocks of 4 rather than a 6 and a 4 that repeats 2 or 3 rows (at
 * B = 8: 4 + 4, not 6 + 4 of which 2 are repeats), 5 a block of 6. */
static inline int rows_in_sixes(int n) {
    int n6 = n / 6 * 6, r = n - n6;
    if (r == 5) return n;
    if ((r == 1 || r == 2) && n6 >= 6) return n6 - 6;
    return n6;
}

#define KERNEL(VT, SFX)                                                                     \
    static inline void kernel##SFX(int mr, int kn, const float *const *a, ptrdiff_t ak,     \
                                   const float *B, ptrdiff_t bk, int jb, VT *c) {           \
        if (mr == 6)                                                                        \
            mk6_##SFX(kn, a, ak, B, bk, jb, c);                                             \
        else                                                                                \
            mk4_##SFX(kn, a, ak, B, bk, jb, c);                                             \
    }
KERNEL(v8, 8)
#if WIDE
KERNEL(v16, 16)
#endif

/* Column strips of two vectors of vw floats (at ja and ja + jb; O >= vw); the last strip
 * ends at column O and may overlap the one before (jb < vw): overlapping columns get the
 * same sums in the same order. Returns the number of strips; strip s is (ja[s], jb[s]). */
static int strips(int O, int vw, int *ja, int *jb) {
    int s = 0;
    for (int j = 0; j < O; j += 2 * vw, s++) {
        if (j + 2 * vw <= O) {
            ja[s] = j;
            jb[s] = vw;
        } else {
            ja[s] = O >= 2 * vw ? O - 2 * vw : 0;
            jb[s] = O - vw - ja[s];
        }
    }
    return s;
}

#define MAX_STRIPS 4096 /* widths up to 65,536 */
#define FUSED_MAX_N 8
/* A member's batch of more rows runs in chunks (sgdn_mlp_step). */
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 128
#endif

/* Row stride, in floats, of the workspace's buffers of O columns (activations, gradients and
 * their transposes): from 64 columns on, a whole number of 64-byte lines that is odd, so
 * that the rows of a column fall in different cache sets. With rows of 256 floats (1 KB), a
 * column of 128 rows fell in 4 of L1's 64 sets, and the products that walk columns (the
 * weight gradient, dx^T) and the forward pass's reads ran from L2. */
static inline int padded(int O) { return O < 64 ? O : ((O + 15) / 16 * 16) | 16; }

/* A forward pass's column strips with vectors VT of VW floats (O >= VW): see linear_fwd. */
#define FWD_STRIPS(VT, VIT, VW, SFX)                                                        \
    static void fwd_strips##SFX(int n, int I, int O, const float *h, int ldh, const float *W, \
                                const float *bias, float *out, int ldo, int relu) {          \
        int ja[MAX_STRIPS], jb[MAX_STRIPS];                                                 \
        int ns = strips(O, VW, ja, jb), n6 = rows_in_sixes(n);                              \
        for (int s = 0; s < ns; s++) {                                                      \
            VT b0 = bias ? *(const VT *)(bias + ja[s]) : (VT){0};                           \
            VT b1 = bias ? *(const VT *)(bias + ja[s] + jb[s]) : (VT){0};                   \
            for (int r0 = 0; r0 < n;) {                                                     \
                int mr = r0 < n6 ? 6 : 4, end = r0 < n6 ? n6 : n;                           \
                int nr = end - r0 < mr ? end - r0 : mr;                                     \
                const float *a[6];                                                          \
                VT c[12];                                                                   \
                for (int m = 0; m < mr; m++) {                                              \
                    a[m] = h + (size_t)(r0 + (m < nr ? m : nr - 1)) * ldh;                  \
                    c[2 * m] = b0;                                                          \
                    c[2 * m + 1] = b1;                                                      \
                }                                                                           \
                kernel##SFX(mr, I, a, 1, W + ja[s], O, jb[s], c);                           \
                for (int m = 0; m < nr; m++) {                                              \
                    float *o = out + (size_t)(r0 + m) * ldo + ja[s];                        \
                    for (int v = 0; v < 2; v++) {                                           \
                        VT x = c[2 * m + v];                                                \
                        *(VT *)(o + v * jb[s]) = relu ? (VT)((VIT)x & ~(x < (VT){0})) : x;  \
                    }                                                                       \
                }                                                                           \
                r0 += nr;                                                                   \
            }                                                                               \
        }                                                                                   \
    }
FWD_STRIPS(v8, vi8, 8, 8)
#if WIDE
FWD_STRIPS(v16, vi16, 16, 16)
#endif

/* out (n x O, rows ldo apart) = h (n x I, rows ldh apart) W (I x O) + bias, then ReLU when
 * `relu` (max(a, 0) that keeps NaN, as torch's relu does: a diverging run must stay NaN). */
#if WIDE
/* The forward pass of a layer of 9 to 15 columns (the classes) on one vector of 16 per row,
 * its loads and stores masked to the O columns, mr rows at a time (a short block repeats
 * its last row): half the multiply-adds of fwd_strips8's two overlapping vectors of 8.
 * Each lane sums what theirs sum, in the same order. */
static inline __attribute__((always_inline)) void fwd_narrow16_rows(
    int nr, int I, int O, const float *h, int ldh, const float *W, const float *bias,
    float *out, int ldo, int relu, const int mr) {
    __mmask16 k16 = (__mmask16)((1u << O) - 1);
    v16 b = bias ? (v16)_mm512_maskz_loadu_ps(k16, bias) : (v16){0}, c[8];
    const float *a[8];
    for (int m = 0; m < mr; m++) {
        a[m] = h + (size_t)(m < nr ? m : nr - 1) * ldh;
        c[m] = b;
    }
    for (int k = 0; k < I; k++) {
        v16 wk = (v16)_mm512_maskz_loadu_ps(k16, W + (size_t)k * O);
        for (int m = 0; m < mr; m++) {
            float x = a[m][k];
            c[m] += x * wk;
        }
    }
    for (int m = 0; m < nr; m++) {
        v16 x = c[m];
        if (relu) x = (v16)((vi16)x & ~(x < (v16){0}));
        _mm512_mask_storeu_ps(out + (size_t)m * ldo, k16, (__m512)x);
    }
}

static void fwd_narrow16(int n, int I, int O, const float *h, int ldh, const float *W,
                         const float *bias, float *out, int ldo, int relu) {
    int r0 = 0;
    for (; r0 + 8 <= n; r0 += 8)
        fwd_narrow16_rows(8, I, O, h + (size_t)r0 * ldh, ldh, W, bias, out + (size_t)r0 * ldo,
                          ldo, relu, 8);
    for (; r0 < n; r0 += 4) {
        int nr = n - r0 < 4 ? n - r0 : 4;
        fwd_narrow16_rows(nr, I, O, h + (size_t)r0 * ldh, ldh, W, bias, out + (size_t)r0 * ldo,
                          ldo, relu, 4);
    }
}
#endif

static void linear_fwd(int n, int I, int O, const float *h, int ldh, const float *W,
                       const float *bias, float *out, int ldo, int relu) {
    if (O < 8) { /* narrower than one vector: plain loops */
        for (int r = 0; r < n; r++)
            for (int j = 0; j < O; j++) {
                float a = bias ? bias[j] : 0.0f;
                for (int i = 0; i < I; i++) a += h[(size_t)r * ldh + i] * W[(size_t)i * O + j];
                out[(size_t)r * ldo + j] = relu && a < 0.0f ? 0.0f : a;
            }
        return;
    }
#if WIDE
    if (O >= 16) {
        fwd_strips16(n, I, O, h, ldh, W, bias, out, ldo, relu);
        return;
    }
    if (O > 8) {
        fwd_narrow16(n, I, O, h, ldh, W, bias, out, ldo, relu);
        return;
    }
#endif
    fwd_strips8(n, I, O, h, ldh, W, bias, out, ldo, relu);
}

/* One heavy-ball step of a parameter row p (len entries) with gradient row gr:
 * grad = gr + wd p; v = m v + grad; p -= lr v (m = 0: p -= lr grad, no buffer). */
static inline void update_row(int len, float *p, float *v, const float *gr, float lr, float m,
                              float wd) {
    int j = 0;
    if (v) {
#if WIDE
        for (; j + 16 <= len; j += 16) {
            v16 pj = *(v16 *)(p + j);
            v16 vj = m * *(v16 *)(v + j) + (*(const v16 *)(gr + j) + wd * pj);
            *(v16 *)(v + j) = vj;
            *(v16 *)(p + j) = pj - lr * vj;
        }
#endif
        for (; j + 8 <= len; j += 8) {
            v8 pj = LD(p + j), vj = bc(m) * LD(v + j) + (LD(gr + j) + bc(wd) * pj);
            ST(v + j, vj);
            ST(p + j, pj - bc(lr) * vj);
        }
        for (; j < len; j++) {
            v[j] = m * v[j] + (gr[j] + wd * p[j]);
            p[j] -= lr * v[j];
        }
    } else {
#if WIDE
        for (; j + 16 <= len; j += 16) {
            v16 pj = *(v16 *)(p + j);
            *(v16 *)(p + j) = pj - lr * (*(const v16 *)(gr + j) + wd * pj);
        }
#endif
        for (; j + 8 <= len; j += 8) {
            v8 pj = LD(p + j);
            ST(p + j, pj - bc(lr) * (LD(gr + j) + bc(wd) * pj));
        }
        for (; j < len; j++) p[j] -= lr * (gr[j] + wd * p[j]);
    }
}

/* gb (O) += the column sums of g (n x O, a workspace buffer: rows padded(O) apart). */
static void column_sums(int n, int O, const float *g, float *gb) {
    int ldg = padded(O);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < O; j++) gb[j] += g[(size_t)r * ldg + j];
}

/* The bias's step: its gradient is g's column sums (gb: O floats of scratch). */
static void bias_update(int n, int O, const float *g, float *bias, float *vb, float lr,
                        float m, float wd, float *gb) {
    for (int j = 0; j < O; j++) gb[j] = 0.0f;
    column_sums(n, O, g, gb);
    update_row(O, bias, vb, gb, lr, m, wd);
}

/* The bias's part of a layer's step: its gradient (g's column sums) added into the gradient
 * buffer's bias row Gb (a chunk of a larger batch), else its update (gb: O floats of
 * scratch). Nothing without a bias. */
static void bias_step(int n, int O, const float *g, float *bias, float *vb, float lr, float m,
                      float wd, float *gb, float *Gb) {
    if (bias && Gb)
        column_sums(n, O, g, Gb);
    else if (bias)
        bias_update(n, O, g, bias, vb, lr, m, wd, gb);
}

/* A chunk's weight gradient row gr (len) added into the gradient buffer's row G, in place
 * of the update (which waits for the last chunk). */
static inline void add_row(int len, float *G, const float *gr) {
    for (int j = 0; j < len; j++) G[j] += gr[j];
}

/* The backward pass and update of a layer narrower than a vector (O < 8) for more than
 * FUSED_MAX_N rows, in plain loops: dx (n x I) = g W^T where the layer's input h > 0, else 0
 * (when dx is given, with the weights before the update), then each row of W takes its step
 * with the weight gradient h^T g, then the bias. With a gradient buffer G (I x O, then the
 * bias's O), the weight and bias gradients are added into it instead (a chunk of a larger
 * batch). gb: O floats of scratch. */
static void linear_bwd_narrow(int n, int I, int O, const float *h, int ldh, const float *g,
                              float *W, float *V, float *bias, float *vb, float *dx, float lr,
                              float m, float wd, float *gb, float *G) {
    int ldg = padded(O), ldx = padded(I);
    if (dx)
        for (int r = 0; r < n; r++)
            for (int i = 0; i < I; i++) {
                float a = 0.0f;
                for (int j = 0; j < O; j++) a += g[(size_t)r * ldg + j] * W[(size_t)i * O + j];
                dx[(size_t)r * ldx + i] = h[(size_t)r * ldh + i] > 0.0f ? a : 0.0f;
            }
    for (int i = 0; i < I; i++) {
        for (int j = 0; j < O; j++) {
            float a = 0.0f;
            for (int r = 0; r < n; r++) a += h[(size_t)r * ldh + i] * g[(size_t)r * ldg + j];
            gb[j] = a;
        }
        if (G)
            add_row(O, G + (size_t)i * O, gb);
        else
            update_row(O, W + (size_t)i * O, V ? V + (size_t)i * O : NULL, gb, lr, m, wd);
    }
    bias_step(n, O, g, bias, vb, lr, m, wd, gb, G ? G + (size_t)I * O : NULL);
}

/* dst (cols x rows, rows ldd apart) = src (rows x cols, rows lds apart) transposed; 8 x 8
 * tiles in registers where AVX is. */
static void transpose(int rows, int cols, const float *src, int lds, float *dst, int ldd) {
    int r8 = 0, c8 = 0;
#if defined(__AVX__)
    r8 = rows - rows % 8;
    c8 = cols - cols % 8;
    for (int r0 = 0; r0 < r8; r0 += 8)
        for (int c0 = 0; c0 < c8; c0 += 8) {
            const float *s0 = src + (size_t)r0 * lds + c0;
            __m256 r[8], t[8], u[8];
            for (int q = 0; q < 8; q++) r[q] = _mm256_loadu_ps(s0 + (size_t)q * lds);
            for (int q = 0; q < 8; q += 2) {
                t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
                t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
            }
            for (int q = 0; q < 8; q += 4) {
                u[q] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
                u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xEE);
                u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
                u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
            }
            float *d0 = dst + (size_t)c0 * ldd + r0;
            for (int q = 0; q < 4; q++) {
                _mm256_storeu_ps(d0 + (size_t)q * ldd, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
                _mm256_storeu_ps(d0 + (size_t)(q + 4) * ldd,
                                 _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
            }
        }
#endif
    /* The edges (everything without AVX): the columns right of the tiles, then the rows below. */
    for (int r = 0; r < r8; r++)
        for (int c = c8; c < cols; c++) dst[(size_t)c * ldd + r] = src[(size_t)r * lds + c];
    for (int r = r8; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[(size_t)c * ldd + r] = src[(size_t)r * lds + c];
}

/* One block of mr rows (a[q], elements ak apart; rows past ni repeat) times B (kn rows, bk
 * apart), strip by strip of its cols columns, with vectors VT of VW floats (cols >= VW): row q
 * of the product into dst + q * ldd for q < ni. With pw (rows of cols floats), each strip
 * prefetches the lines of pw's and pv's first ni rows that it covers: a block's weights and
 * momentum, for its update after the last strip (they come from L3 when a member's weights
 * do not fit in L2). */
#define BLOCK_STRIPS(VT, VW, SFX)                                                           \
    static void block_strips##SFX(int mr, int ni, int kn, const float *const *a, ptrdiff_t ak, \
                                  const float *B, ptrdiff_t bk, int cols, float *dst, int ldd, \
                                  const float *pw, const float *pv) {                       \
        int ja[MAX_STRIPS], jb[MAX_STRIPS], ns = strips(cols, VW, ja, jb);                  \
        if (cols == VW && !pw) { /* one vector: no repeated half */                         \
            VT c[6] = {{0}};                                                                \
            mk1_##SFX(mr, kn, a, ak, B, bk, c);                                             \
            for (int q = 0; q < ni; q++) *(VT *)(dst + (size_t)q * ldd) = c[q];             \
            return;                                                                         \
        }                                                                                   \
        for (int s = 0; s < ns; s++) {                                                      \
            VT c[12];                                                                       \
            for (int q = 0; q < 2 * mr; q++) c[q] = (VT){0};                                \
            kernel##SFX(mr, kn, a, ak, B + ja[s], bk, jb[s], c);                            \
            for (int q = 0; pw && q < ni; q++)                                              \
                for (int o = 0; o < 2 * VW; o += 16) {                                      \
                    size_t at = (size_t)q * cols + ja[s] + o;                               \
                    __builtin_prefetch(pw + at, 1, 3);                                      \
                    if (pv) __builtin_prefetch(pv + at, 1, 3);                              \
                }                                                                           \
            for (int q = 0; q < ni; q++) {                                                  \
                *(VT *)(dst + (size_t)q * ldd + ja[s]) = c[2 * q];                          \
                *(VT *)(dst + (size_t)q * ldd + ja[s] + jb[s]) = c[2 * q + 1];              \
            }                                                                               \
        }                                                                                   \
    }
BLOCK_STRIPS(v8, 8, 8)
#if WIDE
BLOCK_STRIPS(v16, 16, 16)
#endif

static void block_strips(int mr, int ni, int kn, const float *const *a, ptrdiff_t ak,
                         const float *B, ptrdiff_t bk, int cols, float *dst, int ldd,
                         const float *pw, const float *pv) {
#if WIDE
    if (cols >= 16) {
        block_strips16(mr, ni, kn, a, ak, B, bk, cols, dst, ldd, pw, pv);
        return;
    }
#endif
    block_strips8(mr, ni, kn, a, ak, B, bk, cols, dst, ldd, pw, pv);
}

/* The backward pass and update of one layer for more rows (n > FUSED_MAX_N, O >= 8), a
 * block of 6 (or 4) rows of W at a time, so that each row of W is read from memory once
 * and both products run in the register-blocked micro-kernel: the block's rows of
 * dx^T = W g^T (with the weights before the update; g^T in gT), then its rows of the weight
 * gradient h^T g, strip by strip, then those rows' update. When dx is given (dxT: I rows of
 * scratch), dx = (dx^T)^T where h > 0, else 0. Then the bias. With a gradient
 * buffer G (I x O, then the bias's O), the weight and bias gradients are added into it
 * instead of updating (a chunk of a larger batch). rows: 6 x O floats of scratch. */
static void linear_bwd_blocked(int n, int I, int O, const float *h, int ldh, const float *g,
                               float *gT, float *W, float *V, float *bias, float *vb, float *dxT,
                               float *dx, float lr, float m, float wd, float *rows, float *G) {
    int ldg = padded(O), ldx = padded(I), ldt = padded(n);
    if (dx) transpose(n, O, g, ldg, gT, ldt);
    for (int i0 = 0; i0 < I;) {
        int mr = block_rows(I - i0), ni = I - i0 < mr ? I - i0 : mr;
        const float *a[6];
        if (dx) { /* rows i0 .. i0 + ni of dx^T, strip by strip of the n columns */
            for (int q = 0; q < mr; q++) a[q] = W + (size_t)(i0 + (q < ni ? q : ni - 1)) * O;
            block_strips(mr, ni, O, a, 1, gT, ldt, n, dxT + (size_t)i0 * ldt, ldt, NULL, NULL);
        }
        for (int q = 0; q < mr; q++) {
            a[q] = h + i0 + (q < ni ? q : ni - 1); /* column i of h: stride ldh */
        }
        /* The weight gradient's rows, prefetching this block's weights and momentum for the
         * update after the last strip. */
        block_strips(mr, ni, n, a, ldh, g, ldg, O, rows, O, W + (size_t)i0 * O,
                     V ? V + (size_t)i0 * O : NULL);
        /* The block's whole rows of the weight gradient: each row of W and V takes its
         * step in one sequential pass (not in 16-column pieces between the strips, 12
         * scattered lines at a time). */
        for (int q = 0; q < ni; q++) {
            size_t at = (size_t)(i0 + q) * O;
            if (G)
                add_row(O, G + at, rows + (size_t)q * O);
            else
                update_row(O, W + at, V ? V + at : NULL, rows + (size_t)q * O, lr, m, wd);
        }
        i0 += ni;
    }
    if (dx) {
        transpose(I, n, dxT, ldt, dx, ldx);
        for (int r = 0; r < n; r++) {
            float *d = dx + (size_t)r * ldx;
            const float *hr = h + (size_t)r * ldh;
            int j = 0;
            for (; j + 8 <= I; j += 8)
                ST(d + j, (v8)((vi8)LD(d + j) & (vi8)(LD(hr + j) > bc(0.0f))));
            for (; j < I; j++) d[j] = hr[j] > 0.0f ? d[j] : 0.0f;
        }
    }
    bias_step(n, O, g, bias, vb, lr, m, wd, rows, G ? G + (size_t)I * O : NULL);
}

/* fused_row's step over 8 columns, without vectors of 16 (d: the rows' sums it adds to). */
static inline __attribute__((always_inline)) void fused_8(
    float *w, float *v, const float *g0, const float *g1, const float *g2, const float *g3,
    v8 c0, v8 c1, v8 c2, v8 c3, v8 *d, float *row, v8 vm, v8 vwd, v8 vlr, const int has_dx,
    const int first, const int last, const int has_v) {
    v8 wj = LD(w), q0 = LD(g0), q1 = LD(g1), q2 = LD(g2), q3 = LD(g3);
    if (has_dx) {
        d[0] = fma8(q0, wj, d[0]), d[1] = fma8(q1, wj, d[1]), d[2] = fma8(q2, wj, d[2]);
        d[3] = fma8(q3, wj, d[3]);
    }
    v8 acc = first ? bc(0.0f) : LD(row);
    acc += c0 * q0 + c1 * q1 + c2 * q2 + c3 * q3;
    if (!last) {
        ST(row, acc);
    } else if (has_v) {
        v8 vj = vm * LD(v) + (acc + vwd * wj);
        ST(v, vj);
        ST(w, wj - vlr * vj);
    } else {
        ST(w, wj - vlr * (acc + vwd * wj));
    }
}

#if WIDE
/* fused_row's step over 16 columns (mask k: all, or the low 8 of a last group of 8). */
#define LDK(k, p) ((k) == 0xFFFF ? *(const v16 *)(p) : (v16)_mm512_maskz_loadu_ps(k, p))
#define STK(k, p, a)                                                                       \
    do {                                                                                   \
        if ((k) == 0xFFFF)                                                                 \
            *(v16 *)(p) = (a);                                                             \
        else                                                                               \
            _mm512_mask_storeu_ps(p, k, (__m512)(a));                                      \
    } while (0)
static inline __attribute__((always_inline)) void fused_16(
    float *w, float *v, const float *g0, const float *g1, const float *g2, const float *g3,
    float x0, float x1, float x2, float x3, v16 *D, float *row, float m, float wd, float lr,
    const __mmask16 k, const int has_dx, const int first, const int last, const int has_v) {
    v16 wj = LDK(k, w), q0 = LDK(k, g0), q1 = LDK(k, g1), q2 = LDK(k, g2), q3 = LDK(k, g3);
    if (has_dx) {
        /* Each is used twice: GCC loaded it twice, folded into both (10 loads, not 6). */
        IN_REGISTERS(q0, q1);
        IN_REGISTERS(q2, q3);
        IN_REGISTERS(wj, q0);
        D[0] = fma16(q0, wj, D[0]), D[1] = fma16(q1, wj, D[1]), D[2] = fma16(q2, wj, D[2]);
        D[3] = fma16(q3, wj, D[3]);
    }
    v16 acc = first ? (v16){0} : LDK(k, row);
    acc += x0 * q0 + x1 * q1 + x2 * q2 + x3 * q3;
    if (!last) {
        STK(k, row, acc);
    } else if (has_v) {
        v16 vj = m * LDK(k, v) + (acc + wd * wj);
        STK(k, v, vj);
        STK(k, w, wj - lr * vj);
    } else {
        STK(k, w, wj - lr * (acc + wd * wj));
    }
}
#endif

/* linear_bwd_fused's vector loop over a row of W for one block of 4 rows of h and g:
 * specialized by the compiler for each combination of the constant flags (the input
 * gradient wanted, the first block, the last block, a momentum buffer), so the loop carries
 * no branches (at B = 4 it runs 16 times per row of a 256-wide layer).
 *
 * The input gradient's sums over the first O8 columns into sum[0..3]: the columns in groups
 * of 8, the even groups into the lanes of lo, the odd ones into those of hi (each lane in
 * the order of the columns), then hsum(lo + hi). Two chains of multiply-adds per row, not
 * one, so that the loop is not bound by their latency; with vectors of 16, lo and hi are
 * the halves of one, and the four rows' sums are reduced together (dx_sums4), in the same
 * order. */
static inline __attribute__((always_inline)) void fused_row(
    int O8, float *w, float *v, const float *g0, const float *g1, const float *g2,
    const float *g3, v8 c0, v8 c1, v8 c2, v8 c3, float *sum, float *row, v8 vm, v8 vwd,
    v8 vlr, const int has_dx, const int first, const int last, const int has_v) {
    int j = 0;
#if WIDE
    float x0 = c0[0], x1 = c1[0], x2 = c2[0], x3 = c3[0]; /* the rows' inputs */
    v16 D[4] = {{0}, {0}, {0}, {0}};
    for (; j + 16 <= O8; j += 16)
        fused_16(w + j, v ? v + j : v, g0 + j, g1 + j, g2 + j, g3 + j, x0, x1, x2, x3, D,
                 row + j, vm[0], vwd[0], vlr[0], 0xFFFF, has_dx, first, last, has_v);
    if (j < O8) /* a last group of 8 (an even one: the low half), its loads and stores masked */
        fused_16(w + j, v ? v + j : v, g0 + j, g1 + j, g2 + j, g3 + j, x0, x1, x2, x3, D,
                 row + j, vm[0], vwd[0], vlr[0], 0x00FF, has_dx, first, last, has_v);
    if (has_dx) dx_sums4(D[0], D[1], D[2], D[3], sum);
#else
    v8 lo[4] = {bc(0.0f), bc(0.0f), bc(0.0f), bc(0.0f)}, hi[4] = {lo[0], lo[0], lo[0], lo[0]};
    for (; j + 16 <= O8; j += 16) {
        fused_8(w + j, v ? v + j : v, g0 + j, g1 + j, g2 + j, g3 + j, c0, c1, c2, c3, lo,
                row + j, vm, vwd, vlr, has_dx, first, last, has_v);
        fused_8(w + j + 8, v ? v + j + 8 : v, g0 + j + 8, g1 + j + 8, g2 + j + 8, g3 + j + 8,
                c0, c1, c2, c3, hi, row + j + 8, vm, vwd, vlr, has_dx, first, last, has_v);
    }
    if (j < O8) /* a last, even group */
        fused_8(w + j, v ? v + j : v, g0 + j, g1 + j, g2 + j, g3 + j, c0, c1, c2, c3, lo,
                row + j, vm, vwd, vlr, has_dx, first, last, has_v);
    if (has_dx)
        for (int r = 0; r < 4; r++) sum[r] = hsum(lo[r] + hi[r]);
#endif
}

#if WIDE
/* The one-pass backward pass for 5 to 8 rows in one pass over each row of W instead of two
 * (the 32 vector registers of AVX-512 hold the 8 rows' input-gradient sums, their gradient
 * rows and the weight gradient): linear_bwd_fused's sums, in its order (the first block's
 * weight gradient, then the second block's added to it; each block's input gradient as
 * fused_row sums it), without storing and reloading the first block's sums in `row` or
 * loading W twice. For layers whose width O is a multiple of 8. */
static inline __attribute__((always_inline)) void fused8_16(
    float *w, float *v, const float *const *gp, const float *x, v16 *D, float m, float wd,
    float lr, const __mmask16 k, const int has_dx, const int has_v) {
    v16 wj = LDK(k, w), q[8];
    for (int r = 0; r < 8; r++) q[r] = LDK(k, gp[r]);
    if (has_dx) { /* as in fused_16: one load each, not two */
        for (int r = 0; r < 8; r += 2) IN_REGISTERS(q[r], q[r + 1]);
        IN_REGISTERS(wj, q[0]);
        for (int r = 0; r < 8; r++) D[r] = fma16(q[r], wj, D[r]);
    }
    v16 acc = (v16){0};
    acc += x[0] * q[0] + x[1] * q[1] + x[2] * q[2] + x[3] * q[3];
    acc += x[4] * q[4] + x[5] * q[5] + x[6] * q[6] + x[7] * q[7];
    if (has_v) {
        v16 vj = m * LDK(k, v) + (acc + wd * wj);
        STK(k, v, vj);
        STK(k, w, wj - lr * vj);
    } else {
        STK(k, w, wj - lr * (acc + wd * wj));
    }
}

static inline __attribute__((always_inline)) void fused8_row(
    int O, float *w, float *v, const float *const *gp, const float *x, v16 *D, float m,
    float wd, float lr, const int has_dx, const int has_v) {
    int j = 0;
    for (; j + 16 <= O; j += 16) {
        const float *gj[8];
        for (int r = 0; r < 8; r++) gj[r] = gp[r] + j;
        fused8_16(w + j, v ? v + j : v, gj, x, D, m, wd, lr, 0xFFFF, has_dx, has_v);
    }
    if (j < O) { /* a last group of 8 */
        const float *gj[8];
        for (int r = 0; r < 8; r++) gj[r] = gp[r] + j;
        fused8_16(w + j, v ? v + j : v, gj, x, D, m, wd, lr, 0x00FF, has_dx, has_v);
    }
}

static void linear_bwd_fused8(int n, int I, int O, const float *h, int ldh, const float *g,
                              float *W, float *V, float *bias, float *vb, float *dx, float lr,
                              float m, float wd, float *row) {
    int ldg = padded(O), ldx = padded(I);
    const float *gp[8]; /* rows beyond n: the second block's first, with weight 0 */
    for (int r = 0; r < 8; r++) gp[r] = g + (size_t)(r < n ? r : 4) * ldg;
    for (int i = 0; i < I; i++) {
        float *w = W + (size_t)i * O, *v = V ? V + (size_t)i * O : NULL;
        float x[8];
        for (int r = 0; r < 8; r++) x[r] = r < n ? h[(size_t)r * ldh + i] : 0.0f;
        v16 D[8] = {{0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}};
        if (dx && v)
            fused8_row(O, w, v, gp, x, D, m, wd, lr, 1, 1);
        else if (dx)
            fused8_row(O, w, v, gp, x, D, m, wd, lr, 1, 0);
        else if (v)
            fused8_row(O, w, v, gp, x, D, m, wd, lr, 0, 1);
        else
            fused8_row(O, w, v, gp, x, D, m, wd, lr, 0, 0);
        if (dx) {
            float s[8];
            dx_sums4(D[0], D[1], D[2], D[3], s);
            dx_sums4(D[4], D[5], D[6], D[7], s + 4);
            for (int r = 0; r < n; r++) /* + 0.0f: linear_bwd_fused adds its (empty) tail's */
                dx[(size_t)r * ldx + i] = x[r] > 0.0f ? s[r] + 0.0f : 0.0f;
        }
    }
    if (bias) bias_update(n, O, g, bias, vb, lr, m, wd, row);
}
#endif

/* For few rows (n <= FUSED_MAX_N): the backward pass and update of one layer in one pass
 * over W. h (n x I): its input; g (n x O): the loss's
 * gradient at its output. When dx is given: dx (n x I) = g W^T where h > 0, else 0, with
 * the weights before the update. Then W (I x O) and bias (O) take one step (heavy ball with
 * L2; V, vb NULL: plain SGD). row: O floats of scratch. Each row of W is read once from
 * memory: its input gradient, weight gradient and update are computed while it is in L1
 * (rows of h and g in blocks of 4; the weight gradient is carried between blocks in `row`
 * and the update is made in the last block). */
static void linear_bwd_fused(int n, int I, int O, const float *h, int ldh, const float *g,
                             float *W, float *V, float *bias, float *vb, float *dx, float lr,
                             float m, float wd, float *row) {
    int O8 = O - O % 8, ldg = padded(O), ldx = padded(I);
#if WIDE
    if (n > 4 && O8 == O) {
        linear_bwd_fused8(n, I, O, h, ldh, g, W, V, bias, vb, dx, lr, m, wd, row);
        return;
    }
#endif
    v8 vm = bc(m), vwd = bc(wd), vlr = bc(lr);
    for (int i = 0; i < I; i++) {
        float *w = W + (size_t)i * O, *v = V ? V + (size_t)i * O : NULL;
        for (int r0 = 0; r0 < n; r0 += 4) {
            int nr = n - r0 < 4 ? n - r0 : 4, last = r0 + 4 >= n;
            const float *g0 = g + (size_t)r0 * ldg;
            const float *g1 = nr > 1 ? g0 + ldg : g0, *g2 = nr > 2 ? g0 + 2 * ldg : g0;
            const float *g3 = nr > 3 ? g0 + 3 * ldg : g0;
            /* Rows beyond n count with weight 0 in the weight gradient. */
            float x0 = h[(size_t)r0 * ldh + i];
            float x1 = nr > 1 ? h[(size_t)(r0 + 1) * ldh + i] : 0.0f;
            float x2 = nr > 2 ? h[(size_t)(r0 + 2) * ldh + i] : 0.0f;
            float x3 = nr > 3 ? h[(size_t)(r0 + 3) * ldh + i] : 0.0f;
            v8 c0 = bc(x0), c1 = bc(x1), c2 = bc(x2), c3 = bc(x3);
            float sum[4];
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            switch ((dx != NULL) << 3 | (r0 == 0) << 2 | last << 1 | (v != NULL)) {
#define FUSED_ROW(DX, FIRST, LAST, HV)                                                    \
    case DX << 3 | FIRST << 2 | LAST << 1 | HV:                                            \
        fused_row(O8, w, v, g0, g1, g2, g3, c0, c1, c2, c3, sum, row, vm, vwd, vlr, DX,      \
                  FIRST, LAST, HV);                                                        \
        break;
                FUSED_ROW(0, 0, 0, 0) FUSED_ROW(0, 0, 0, 1) FUSED_ROW(0, 0, 1, 0)
                FUSED_ROW(0, 0, 1, 1) FUSED_ROW(0, 1, 0, 0) FUSED_ROW(0, 1, 0, 1)
                FUSED_ROW(0, 1, 1, 0) FUSED_ROW(0, 1, 1, 1) FUSED_ROW(1, 0, 0, 0)
                FUSED_ROW(1, 0, 0, 1) FUSED_ROW(1, 0, 1, 0) FUSED_ROW(1, 0, 1, 1)
                FUSED_ROW(1, 1, 0, 0) FUSED_ROW(1, 1, 0, 1) FUSED_ROW(1, 1, 1, 0)
                FUSED_ROW(1, 1, 1, 1)
#undef FUSED_ROW
            }
            for (int j = O8; j < O; j++) {
                float wj = w[j];
                if (dx) {
                    s0 += g0[j] * wj; s1 += g1[j] * wj; s2 += g2[j] * wj; s3 += g3[j] * wj;
                }
                float acc = (r0 ? row[j] : 0.0f) + (x0 * g0[j] + x1 * g1[j] + x2 * g2[j] +
                                                    x3 * g3[j]);
                if (!last) {
                    row[j] = acc;
                } else if (v) {
                    v[j] = m * v[j] + (acc + wd * wj);
                    w[j] = wj - lr * v[j];
                } else {
                    w[j] = wj - lr * (acc + wd * wj);
                }
            }
            if (dx) {
                float s[4] = {sum[0] + s0, sum[1] + s1, sum[2] + s2, sum[3] + s3};
                for (int r = 0; r < nr; r++) {
                    float x = h[(size_t)(r0 + r) * ldh + i];
                    dx[(size_t)(r0 + r) * ldx + i] = x > 0.0f ? s[r] : 0.0f;
                }
            }
        }
    }
    if (bias) bias_update(n, O, g, bias, vb, lr, m, wd, row);
}

/* linear_bwd_narrow_out in the blocked order, for nv (1 or 2) vectors of columns i, i + 8:
 * the weight gradient's rows of dW^T summed over the rows in order, as the micro-kernel sums
 * them, 6 columns of g at a time (the last 6 may repeat some); then dx (when given), a block
 * of 6 rows at a time (a short block repeats its last), each sum over the columns in order,
 * as dx^T = W g^T sums it. nv x 6 accumulators stay in registers. */
#if WIDE
/* narrow_blocked for two vectors of 8 columns i as one vector of 16: the same sums, each
 * lane in its order. */
static void narrow_blocked16(int n, int O, const float *h, int ldh, const float *g, int ldg,
                             const float *WT, int ldw, float *dWT, float *dx, int ldx, int i) {
    for (int j0 = 0; j0 < O; j0 += 6) {
        int j = j0 + 6 <= O ? j0 : O - 6;
        v16 acc[6];
        for (int q = 0; q < 6; q++) acc[q] = (v16){0};
        for (int r = 0; r < n; r++) {
            v16 hv = *(const v16 *)(h + (size_t)r * ldh + i);
            const float *gr = g + (size_t)r * ldg + j;
            for (int q = 0; q < 6; q++) acc[q] = fma16(hv, bc16(gr[q]), acc[q]);
        }
        for (int q = 0; q < 6; q++) *(v16 *)(dWT + (size_t)(j + q) * ldw + i) = acc[q];
    }
    if (!dx) return;
    for (int r0 = 0; r0 < n;) {
        int nr = n - r0 < 6 ? n - r0 : 6;
        const float *gq[6];
        v16 acc[6];
        for (int q = 0; q < 6; q++) {
            gq[q] = g + (size_t)(r0 + (q < nr ? q : nr - 1)) * ldg;
            acc[q] = (v16){0};
        }
        for (int j = 0; j < O; j++) {
            v16 wv = *(const v16 *)(WT + (size_t)j * ldw + i);
            for (int q = 0; q < 6; q++) acc[q] = fma16(wv, bc16(gq[q][j]), acc[q]);
        }
        for (int q = 0; q < nr; q++) {
            v16 hr = *(const v16 *)(h + (size_t)(r0 + q) * ldh + i);
            *(v16 *)(dx + (size_t)(r0 + q) * ldx + i) =
                (v16)((vi16)acc[q] & (vi16)(hr > (v16){0}));
        }
        r0 += nr;
    }
}
#endif

static inline __attribute__((always_inline)) void narrow_blocked(
    int n, int O, const float *h, int ldh, const float *g, int ldg, const float *WT, int ldw,
    float *dWT, float *dx, int ldx, int i, const int nv) {
#if WIDE
    if (nv == 2) {
        narrow_blocked16(n, O, h, ldh, g, ldg, WT, ldw, dWT, dx, ldx, i);
        return;
    }
#endif
    for (int j0 = 0; j0 < O; j0 += 6) {
        int j = j0 + 6 <= O ? j0 : O - 6;
        v8 acc[2][6];
        for (int v = 0; v < nv; v++)
            for (int q = 0; q < 6; q++) acc[v][q] = bc(0.0f);
        for (int r = 0; r < n; r++) {
            v8 hv[2];
            for (int v = 0; v < nv; v++) hv[v] = LD(h + (size_t)r * ldh + i + 8 * v);
            const float *gr = g + (size_t)r * ldg + j;
            for (int q = 0; q < 6; q++) {
                v8 gq = bc(gr[q]);
                for (int v = 0; v < nv; v++) acc[v][q] = fma8(hv[v], gq, acc[v][q]);
            }
        }
        for (int v = 0; v < nv; v++)
            for (int q = 0; q < 6; q++) ST(dWT + (size_t)(j + q) * ldw + i + 8 * v, acc[v][q]);
    }
    if (!dx) return;
    for (int r0 = 0; r0 < n;) {
        int nr = n - r0 < 6 ? n - r0 : 6;
        const float *gq[6];
        v8 acc[2][6];
        for (int q = 0; q < 6; q++) {
            gq[q] = g + (size_t)(r0 + (q < nr ? q : nr - 1)) * ldg;
            for (int v = 0; v < nv; v++) acc[v][q] = bc(0.0f);
        }
        for (int j = 0; j < O; j++) {
            v8 wv[2];
            for (int v = 0; v < nv; v++) wv[v] = LD(WT + (size_t)j * ldw + i + 8 * v);
            for (int q = 0; q < 6; q++) {
                v8 gj = bc(gq[q][j]);
                for (int v = 0; v < nv; v++) acc[v][q] = fma8(wv[v], gj, acc[v][q]);
            }
        }
        for (int q = 0; q < nr; q++)
            for (int v = 0; v < nv; v++) {
                v8 hr = LD(h + (size_t)(r0 + q) * ldh + i + 8 * v);
                ST(dx + (size_t)(r0 + q) * ldx + i + 8 * v,
                   (v8)((vi8)acc[v][q] & (vi8)(hr > bc(0.0f))));
            }
        r0 += nr;
    }
}

/* The backward pass and update of an output layer of 8 to 15 columns (the classes) on a
 * wider input (I >= 8), vectorized along I instead of along the few columns: the other
 * paths spend most of such a layer's time on loop overhead, horizontal sums and a half-empty
 * second vector (at B = 4 it took 13 % of a member-step for 3 % of its arithmetic). Every
 * sum runs in the order of the path it replaces, so the results are the same to the bit:
 * with `fused` (n <= FUSED_MAX_N) that of linear_bwd_fused, else that of linear_bwd_blocked
 * (with a gradient buffer G for chunked batches). The weights are transposed into WT first
 * (dx takes them before the update), the weight gradient is built as dW^T, transposed into
 * dW (I x O) and applied in one pass over the layer. A last vector of columns i that would
 * run past I starts at I - 8 instead: the columns it repeats get the same sums. nar:
 * NARROW_WS(I) floats of scratch. */
#ifndef NARROW_MAX_O
#define NARROW_MAX_O 16 /* 8: off (the other paths take these layers) */
#endif
#define NARROW_WS(I) ((int64_t)NARROW_MAX_O * (2 * padded(I) + (I)))
static void linear_bwd_narrow_out(int n, int I, int O, const float *h, int ldh, const float *g,
                                  float *W, float *V, float *bias, float *vb, float *dx, float lr,
                                  float m, float wd, int fused, float *nar, float *G) {
    int ldg = padded(O), ldx = padded(I), ldw = padded(I);
    float *WT = nar, *dWT = WT + (size_t)NARROW_MAX_O * ldw;
    float *dW = dWT + (size_t)NARROW_MAX_O * ldw;
    if (dx) transpose(I, O, W, O, WT, ldw);
    if (fused) {
        /* Row j of dW^T: rows of h and g in blocks of 4, each block's products summed as in
         * fused_row; rows beyond n count with weight 0 (and the block's first row of g). */
        for (int j = 0; j < O; j++) {
            v8 q[FUSED_MAX_N];
            for (int r = 0; r < n + (-n & 3); r++)
                q[r] = bc(g[(size_t)(r < n ? r : r & ~3) * ldg + j]);
            int i0 = 0;
#if WIDE
            for (; i0 + 16 <= I; i0 += 16) { /* the same sums, 16 columns at a time */
                v16 acc = (v16){0}, Q[FUSED_MAX_N];
                for (int r = 0; r < n + (-n & 3); r++) Q[r] = bc16(q[r][0]);
                for (int r0 = 0; r0 < n; r0 += 4) {
                    int nr = n - r0 < 4 ? n - r0 : 4;
                    const float *hr = h + (size_t)r0 * ldh + i0;
                    v16 c0 = *(const v16 *)hr;
                    v16 c1 = nr > 1 ? *(const v16 *)(hr + ldh) : (v16){0};
                    v16 c2 = nr > 2 ? *(const v16 *)(hr + 2 * ldh) : (v16){0};
                    v16 c3 = nr > 3 ? *(const v16 *)(hr + 3 * ldh) : (v16){0};
                    acc += fma16(c3, Q[r0 + 3],
                                 fma16(c2, Q[r0 + 2], fma16(c0, Q[r0], c1 * Q[r0 + 1])));
                }
                *(v16 *)(dWT + (size_t)j * ldw + i0) = acc;
            }
#endif
            for (; i0 < I; i0 += 8) {
                int i = i0 + 8 <= I ? i0 : I - 8;
                v8 acc = bc(0.0f);
                for (int r0 = 0; r0 < n; r0 += 4) {
                    int nr = n - r0 < 4 ? n - r0 : 4;
                    const float *hr = h + (size_t)r0 * ldh + i;
                    v8 c0 = LD(hr), c1 = nr > 1 ? LD(hr + ldh) : bc(0.0f);
                    v8 c2 = nr > 2 ? LD(hr + 2 * ldh) : bc(0.0f);
                    v8 c3 = nr > 3 ? LD(hr + 3 * ldh) : bc(0.0f);
                    acc += fma8(c3, q[r0 + 3],
                                fma8(c2, q[r0 + 2], fma8(c0, q[r0], c1 * q[r0 + 1])));
                }
                ST(dWT + (size_t)j * ldw + i, acc);
            }
        }
        /* dx as fused_row's one vector of 8 columns, summed across its lanes as hsum, plus
         * the other columns one by one. */
        if (dx)
            for (int r = 0; r < n; r++) {
                const float *gr = g + (size_t)r * ldg;
                v8 q[NARROW_MAX_O];
                for (int j = 0; j < O; j++) q[j] = bc(gr[j]);
                int i0 = 0;
#if WIDE
                for (; i0 + 16 <= I; i0 += 16) { /* the same sums, 16 columns at a time */
                    v16 p[8], tail = (v16){0};
                    const float *wt = WT + i0;
                    for (int j = 0; j < 8; j++)
                        p[j] = fma16(bc16(gr[j]), *(const v16 *)(wt + (size_t)j * ldw),
                                     (v16){0});
                    for (int j = 8; j < O; j++)
                        tail = fma16(bc16(gr[j]), *(const v16 *)(wt + (size_t)j * ldw), tail);
                    v16 sv = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
                    sv = sv + tail;
                    v16 hr = *(const v16 *)(h + (size_t)r * ldh + i0);
                    *(v16 *)(dx + (size_t)r * ldx + i0) =
                        (v16)((vi16)sv & (vi16)(hr > (v16){0}));
                }
#endif
                for (; i0 < I; i0 += 8) {
                    int i = i0 + 8 <= I ? i0 : I - 8;
                    v8 p[8], tail = bc(0.0f);
                    const float *wt = WT + i;
                    for (int j = 0; j < 8; j++)
                        p[j] = fma8(q[j], LD(wt + (size_t)j * ldw), bc(0.0f));
                    for (int j = 8; j < O; j++) tail = fma8(q[j], LD(wt + (size_t)j * ldw), tail);
                    v8 s = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
                    s = s + tail;
                    v8 hr = LD(h + (size_t)r * ldh + i);
                    ST(dx + (size_t)r * ldx + i, (v8)((vi8)s & (vi8)(hr > bc(0.0f))));
                }
            }
    } else {
        /* Two vectors of columns i at a time while two fit, then one (the last may start at
         * I - 8, repeating some). */
        for (int i0 = 0; i0 < I;) {
            if (i0 + 16 <= I) {
                narrow_blocked(n, O, h, ldh, g, ldg, WT, ldw, dWT, dx, ldx, i0, 2);
                i0 += 16;
            } else {
                int i = i0 + 8 <= I ? i0 : I - 8;
                narrow_blocked(n, O, h, ldh, g, ldg, WT, ldw, dWT, dx, ldx, i, 1);
                i0 += 8;
            }
        }
    }
    transpose(O, I, dWT, ldw, dW, O);
    if (G)
        add_row(I * O, G, dW);
    else
        update_row(I * O, W, V, dW, lr, m, wd);
    bias_step(n, O, g, bias, vb, lr, m, wd, dW, G ? G + (size_t)I * O : NULL);
}

/* log(sum_j exp(z_j)) of one row of C logits, shifted by its largest (NaN stays NaN). */
static inline float log_sum_exp(int C, const float *z) {
    float mx = z[0];
    for (int j = 1; j < C; j++) mx = z[j] > mx ? z[j] : mx;
    float sum = 0.0f;
    for (int j = 0; j < C; j++) sum += expf(z[j] - mx);
    return mx + logf(sum);
}

static int widest(int L, const int64_t *dims) {
    int w = 0;
    for (int l = 0; l <= L; l++) w = dims[l] > w ? (int)dims[l] : w;
    return w;
}

/* Rows per chunk of a member's batch of n rows: n itself up to CHUNK_ROWS, else the batch
 * in equal chunks of at most CHUNK_ROWS (so none is short: every chunk has more than
 * CHUNK_ROWS / 2 > FUSED_MAX_N rows and takes the blocked backward pass). */
_Static_assert(CHUNK_ROWS / 2 >= FUSED_MAX_N, "chunks take the blocked backward pass");
static int chunk_rows(int n) {
    int chunks = (n + CHUNK_ROWS - 1) / CHUNK_ROWS;
    return (n + chunks - 1) / chunks;
}

/* Floats of the gradient buffer of a chunked step: every layer's weights and biases. */
static int64_t grad_floats(int L, const int64_t *dims) {
    int64_t s = 0;
    for (int l = 0; l < L; l++) s += dims[l] * dims[l + 1] + dims[l + 1];
    return s;
}

/* Floats rounded up to a cache line's 16: each part of the workspace starts on a line (the
 * workspace does, as torch's allocations do), so that a row of a padded buffer is read in
 * whole lines. (The gradient rows of the one-pass backward once started half a line in,
 * after the 10-wide logits: every load of 16 floats touched two lines, and at B = 4 the
 * 256 x 256 layer's backward pass took 1.6 times as long.) */
static inline int64_t lines(int64_t floats) { return (floats + 15) / 16 * 16; }

/* Floats of workspace sgdn_mlp_step needs for members of n rows: one chunk's activations
 * (every layer's output), two gradient buffers and two for their transposes (rows padded),
 * 6 rows of scratch and the narrow output layer's; for a batch in several chunks, the
 * gradient buffer. */
int64_t sgdn_mlp_ws_floats(int n, int L, const int64_t *dims) {
    int c = chunk_rows(n), wide = widest(L, dims);
    int64_t s = 0;
    for (int l = 1; l <= L; l++) s += lines((int64_t)c * padded((int)dims[l]));
    s += 2 * lines((int64_t)c * padded(wide)) + 2 * lines((int64_t)wide * padded(c)) +
         lines(6 * (int64_t)wide) + lines(NARROW_WS(wide));
    return c < n ? s + grad_floats(L, dims) : s;
}

/* The update of member k's parameters with the gradient G (every layer's weights, then its
 * biases, in the order of grad_floats), learning rate lr, momentum buffers V, vb when
 * m != 0. */
static void apply_grad(int k, int L, const int64_t *dims, float *const *W, float *const *b,
                       float *const *V, float *const *vb, const float *G, float lr, float m,
                       float wd) {
    for (int l = 0; l < L; l++) {
        int I = (int)dims[l], O = (int)dims[l + 1];
        size_t wo = (size_t)k * I * O;
        for (int i = 0; i < I; i++) {
            size_t at = wo + (size_t)i * O;
            update_row(O, W[l] + at, m != 0.0f ? V[l] + at : NULL, G + (size_t)i * O, lr, m,
                       wd);
        }
        if (b[l])
            update_row(O, b[l] + (size_t)k * O, m != 0.0f ? vb[l] + (size_t)k * O : NULL,
                       G + (size_t)I * O, lr, m, wd);
        G += (size_t)I * O + O;
    }
}

/* One step of member k: forward on its rows x (n x I_0) with labels y, its mean cross-entropy
 * into *loss, backward, and the update with learning rate lr (momentum buffers V, vb when
 * m != 0). dims: the L + 1 layer widths. With `grad` (grad_floats zeroed floats; then more
 * than FUSED_MAX_N rows), no update: the gradient of the mean loss is added into it.
 * noipa: one function, compiled alone, whatever calls it. GCC otherwise clones or inlines it
 * by its callers, and with -ffp-contract=fast the multiply-adds it fuses in the plain loops
 * of the narrow layers then change with those decisions (a third caller changed the bits
 * of layers of 7 and 3 units). */
static __attribute__((noipa)) void
member_step(int k, int n, int L, const int64_t *dims, float *const *W, float *const *b,
            float *const *V, float *const *vb, const float *x, const int64_t *y, float *ws,
            float lr, float m, float wd, float *loss, float *grad) {
    int C = (int)dims[L], wide = widest(L, dims), c = chunk_rows(n), chunked = c < n;
    const float *ins[64]; /* each layer's input: x, then the hidden outputs (padded rows) */
    int ld[64];           /* their row strides */
    ld[0] = (int)dims[0];
    for (int l = 1; l <= L; l++) ld[l] = padded((int)dims[l]);
    float *acts = ws, *at = ws;
    for (int l = 1; l <= L; l++) at += lines((int64_t)c * ld[l]);
    float *ga = at, *gb = ga + lines((int64_t)c * padded(wide));
    float *gT = gb + lines((int64_t)c * padded(wide));
    float *dxT = gT + lines((int64_t)wide * padded(c));
    float *row = dxT + lines((int64_t)wide * padded(c));
    float *nar = row + lines(6 * (int64_t)wide);
    float *G = grad ? grad : chunked ? nar + lines(NARROW_WS(wide)) : NULL;
    float *Gl[64]; /* layer l's at Gl[l] */
    for (int l = 0; l < L; l++) /* layer l's gradients follow those of the layers before */
        Gl[l] = G && l ? Gl[l - 1] + dims[l - 1] * dims[l] + dims[l] : G;
    float inv = 1.0f / (float)n, total = 0.0f;
    if (G && !grad) memset(G, 0, (size_t)grad_floats(L, dims) * sizeof(float));
    for (int r0 = 0; r0 < n; r0 += c) {
        int nc = n - r0 < c ? n - r0 : c;
        const int64_t *yk = y + r0;
        ins[0] = x + (size_t)r0 * dims[0];
        float *out = acts;
        for (int l = 0; l < L; l++) {
            int I = (int)dims[l], O = (int)dims[l + 1];
            const float *bk = b[l] ? b[l] + (size_t)k * O : NULL;
            linear_fwd(nc, I, O, ins[l], ld[l], W[l] + (size_t)k * I * O, bk, out, ld[l + 1],
                       l < L - 1);
            ins[l + 1] = out;
            out += lines((int64_t)c * ld[l + 1]);
        }
        /* Logits -> the loss (log-sum-exp) and the gradient (softmax - onehot) / n. */
        const float *z = ins[L];
        for (int r = 0; r < nc; r++) {
            const float *zr = z + (size_t)r * ld[L];
            float lse = log_sum_exp(C, zr);
            total += lse - zr[yk[r]];
            float *gr = ga + (size_t)r * ld[L];
            for (int j = 0; j < C; j++)
                gr[j] = (expf(zr[j] - lse) - (j == yk[r] ? 1.0f : 0.0f)) * inv;
        }
        float *g = ga, *spare = gb;
        for (int l = L - 1; l >= 0; l--) {
            int I = (int)dims[l], O = (int)dims[l + 1];
            size_t wo = (size_t)k * I * O;
            float *bk = b[l] ? b[l] + (size_t)k * O : NULL;
            float *Vk = m != 0.0f ? V[l] + wo : NULL;
            float *vbk = m != 0.0f && b[l] ? vb[l] + (size_t)k * O : NULL;
            float *dx = l > 0 ? spare : NULL;
            if (O >= 8 && O < NARROW_MAX_O && I >= 8)
                linear_bwd_narrow_out(nc, I, O, ins[l], ld[l], g, W[l] + wo, Vk, bk, vbk, dx, lr,
                                      m, wd, nc <= FUSED_MAX_N, nar, Gl[l]);
            else if (nc <= FUSED_MAX_N) /* never chunked: chunks are longer */
                linear_bwd_fused(nc, I, O, ins[l], ld[l], g, W[l] + wo, Vk, bk, vbk, dx, lr, m,
                                 wd, row);
            else if (O >= 8)
                linear_bwd_blocked(nc, I, O, ins[l], ld[l], g, gT, W[l] + wo, Vk, bk, vbk, dxT,
                                   dx, lr, m, wd, row, Gl[l]);
            else
                linear_bwd_narrow(nc, I, O, ins[l], ld[l], g, W[l] + wo, Vk, bk, vbk, dx, lr, m,
                                  wd, row, Gl[l]);
            float *t = g;
            g = spare;
            spare = t;
        }
    }
    if (G && !grad) /* the whole batch's gradient: now the update */
        apply_grad(k, L, dims, W, b, V, vb, G, lr, m, wd);
    *loss = total / (float)n;
}

/* One step of every member k: forward on its rows x[k] (n x I_0) with labels y[k], its mean
 * cross-entropy into losses[k], backward, and the update with learning rate lrs[k]
 * (momentum buffers V, vb when m != 0). dims: the L + 1 layer widths. */
void sgdn_mlp_step(int K, int n, int L, const int64_t *dims, float *const *W, float *const *b,
                   float *const *V, float *const *vb, const float *x, const int64_t *y,
                   float *ws, const float *lrs, float m, float wd, float *losses) {
    for (int k = 0; k < K; k++)
        member_step(k, n, L, dims, W, b, V, vb, x + (size_t)k * n * dims[0], y + (size_t)k * n,
                    ws, lrs[k], m, wd, losses + k, NULL);
}

/* sum_i v_i^2 in double over n floats, adding G_i += v_i * scale on the way when G is given:
 * 16 partial sums in interleaved lanes, then added in order (a fixed order that vectorizes;
 * one running sum would be a chain of dependent additions, slower than the step itself). */
static double sum_sq(const float *v, int64_t n, float *G, float scale) {
    double acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) {
            acc[l] += (double)v[i + l] * v[i + l];
            if (G) G[i + l] += v[i + l] * scale;
        }
    for (int l = 0; i < n; i++, l++) {
        acc[l] += (double)v[i] * v[i];
        if (G) G[i] += v[i] * scale;
    }
    double s = 0.0;
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

/* Floats of the two gradient buffers sgdn_mlp_accum_step takes (G, then g). */
int64_t sgdn_mlp_grad_floats(int L, const int64_t *dims) { return 2 * lines(grad_floats(L, dims)); }

/* One step of every member k in J micro-batches of n rows (more than FUSED_MAX_N): x[k]
 * (J*n x I_0) and y[k], micro-batch j their rows j*n .. j*n + n. Each micro-batch's gradient
 * of its mean loss g_j, then G = sum_j g_j / J (the gradient of the whole batch's mean loss)
 * and the update with G, as one step of J*n rows. For the gradient noise scale, sq[2k] gets
 * sum_j |g_j|^2 and sq[2k + 1] |G|^2 (in double); losses[k] the last micro-batch's mean loss.
 * grads: sgdn_mlp_grad_floats floats; ws: sgdn_mlp_ws_floats(n, ...). */
void sgdn_mlp_accum_step(int K, int J, int n, int L, const int64_t *dims, float *const *W,
                         float *const *b, float *const *V, float *const *vb, const float *x,
                         const int64_t *y, float *ws, float *grads, const float *lrs, float m,
                         float wd, float *losses, double *sq) {
    int64_t nf = grad_floats(L, dims);
    float *G = grads, *g = grads + lines(nf), inv = 1.0f / (float)J;
    for (int k = 0; k < K; k++) {
        memset(G, 0, (size_t)nf * sizeof(float));
        double small = 0.0;
        for (int j = 0; j < J; j++) {
            size_t r0 = ((size_t)k * J + j) * n;
            memset(g, 0, (size_t)nf * sizeof(float));
            member_step(k, n, L, dims, W, b, V, vb, x + r0 * dims[0], y + r0, ws, 0.0f, m, wd,
                        losses + k, g);
            small += sum_sq(g, nf, G, inv);
        }
        sq[2 * k] = small;
        sq[2 * k + 1] = sum_sq(G, nf, NULL, 0.0f);
        apply_grad(k, L, dims, W, b, V, vb, G, lrs[k], m, wd);
    }
}

/* T consecutive steps of every member, each exactly sgdn_mlp_step on its gathered batch:
 * what the training loop would do with T calls, without the interpreter between them, and
 * member by member: a member's T steps run back to back while its weights and momentum
 * stay in L2 (step by step, a pack's members would stream theirs from L3 at every step;
 * members are independent, so the order changes no result). Step t's batch of member k is
 * rows idx[s][t*n .. t*n + n) of X (N x I_0) and Y, where s = stream_of[k]: members of one
 * seed share a stream (their data order), idx[s] holds T*n example indices. lrs (T x K):
 * each step's learning rates; losses (T x K) receives each step's mean losses. xb (at least
 * n*I_0 floats) and yb (n) hold a step's gathered batch; ws: sgdn_mlp_ws_floats(n, ...)
 * floats, as for sgdn_mlp_step. */
void sgdn_mlp_steps(int T, int K, int n, int L, const int64_t *dims, float *const *W,
                    float *const *b, float *const *V, float *const *vb, const float *X,
                    const int64_t *Y, const int64_t *const *idx, const int64_t *stream_of,
                    float *xb, int64_t *yb, float *ws, const float *lrs, float m, float wd,
                    float *losses) {
    size_t I0 = (size_t)dims[0];
    for (int k = 0; k < K; k++)
        for (int t = 0; t < T; t++) {
            const int64_t *rows = idx[stream_of[k]] + (size_t)t * n;
            for (int r = 0; r < n; r++) {
                memcpy(xb + (size_t)r * I0, X + (size_t)rows[r] * I0, I0 * sizeof(float));
                yb[r] = Y[rows[r]];
            }
            member_step(k, n, L, dims, W, b, V, vb, xb, yb, ws, lrs[(size_t)t * K + k], m, wd,
                        losses + (size_t)t * K + k, NULL);
        }
}

/* Evaluation: every member on the same n examples x (n x I_0) with labels y, adding member
 * k's summed cross-entropy into sums[2k] and its number of correct predictions (argmax of
 * the logits, the first of equal ones; NaN counts as the largest, as in torch) into
 * sums[2k + 1]. Member by member, so that its weights stay in L2 while the rows pass in
 * chunks of EVAL_ROWS; each layer's output overwrites the one before the last (ws:
 * sgdn_mlp_eval_ws_floats floats). */
#define EVAL_ROWS 64
int64_t sgdn_mlp_eval_ws_floats(int L, const int64_t *dims) {
    return 2 * (int64_t)EVAL_ROWS * padded(widest(L, dims));
}

void sgdn_mlp_eval(int K, int n, int L, const int64_t *dims, float *const *W, float *const *b,
                   const float *x, const int64_t *y, float *ws, double *sums) {
    int C = (int)dims[L], wide = padded(widest(L, dims));
    float *buf[2] = {ws, ws + (size_t)EVAL_ROWS * wide};
    for (int k = 0; k < K; k++) {
        double loss = 0.0, correct = 0.0;
        for (int r0 = 0; r0 < n; r0 += EVAL_ROWS) {
            int nc = n - r0 < EVAL_ROWS ? n - r0 : EVAL_ROWS;
            const float *in = x + (size_t)r0 * dims[0];
            int ldin = (int)dims[0];
            for (int l = 0; l < L; l++) {
                int I = (int)dims[l], O = (int)dims[l + 1];
                const float *bk = b[l] ? b[l] + (size_t)k * O : NULL;
                linear_fwd(nc, I, O, in, ldin, W[l] + (size_t)k * I * O, bk, buf[l % 2], padded(O),
                           l < L - 1);
                in = buf[l % 2];
                ldin = padded(O);
            }
            for (int r = 0; r < nc; r++) {
                const float *zr = in + (size_t)r * ldin;
                int best = 0;
                for (int j = 1; j < C; j++)
                    if (isnan(zr[j]) ? !isnan(zr[best]) : zr[j] > zr[best]) best = j;
                loss += (double)(log_sum_exp(C, zr) - zr[y[r0 + r]]);
                correct += best == y[r0 + r];
            }
        }
        sums[2 * k] += loss;
        sums[2 * k + 1] += correct;
    }
}
