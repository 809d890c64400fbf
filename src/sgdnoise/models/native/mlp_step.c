/* A pack of plain MLPs (Linear, ReLU, ..., Linear; cross-entropy) trained by heavy-ball SGD
 * with L2, one optimizer step at a time, member by member, in one call per phase.
 *
 * Why this exists: at the small batch sizes of the noise-dominated regime a member's step
 * is a few matrix products with 4 to 32 rows, and torch's batched kernels run those at a
 * quarter of the CPU's peak, then stream every weight through memory three more times
 * (gradient, momentum, update). Here each weight row is read once in the forward pass and
 * once in the backward pass, where the input gradient, the weight gradient, the momentum
 * and the update are all computed while the row is in registers and L1.
 *
 * The math is that of sgdnoise.models.packed_mlp (and so of autograd and torch's fused
 * SGD): forward h_{l+1} = relu(h_l W_l + b_l), loss = mean over rows of
 * logsumexp(z) - z_y; backward g_L = (softmax(z) - onehot(y)) / n, dx = (g W^T) where the
 * layer's input is > 0, else 0; update grad = h^T g + wd W, v = m v + grad, W -= lr v
 * (m = 0: no buffer, W -= lr grad). Sums run in another order than torch's, so results
 * agree to float rounding, not to the bit.
 *
 * Layouts (all float32, C-contiguous): W_l (K, I_l, O_l), b_l (K, O_l), the same for the
 * momentum buffers; x (K, n, I_0); y (K, n) int64. The workspace holds, per member, the
 * input of every layer after the first and the last layer's probabilities.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi8 __attribute__((vector_size(32), aligned(4), may_alias));

#define LD(p) (*(const v8 *)(p))
#define ST(p, v) (*(v8 *)(p) = (v))

static inline v8 bc(float a) { return (v8){a, a, a, a, a, a, a, a}; }

static inline float hsum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* max(a, 0) that keeps NaN, as torch's relu does (a diverging run must stay NaN). */
static inline v8 relu8(v8 a) { return (v8)((vi8)a & ~(a < bc(0.0f))); }

/* Rows r0 .. r0+nr-1 (nr <= 4) of out = h W + bias at the 16 columns ja .. ja+7 and
 * jb .. jb+7 (which may overlap: the shared columns get the same sums, in the same order).
 * Eight accumulators in registers; each W row segment loaded once for the four rows. */
static inline void fwd_block(int n, int I, int O, const float *h, const float *W,
                             const float *bias, float *out, int relu, int r0, int ja, int jb) {
    int nr = n - r0 < 4 ? n - r0 : 4;
    /* A short last block repeats its last row (computed, not stored). */
    const float *h0 = h + (size_t)r0 * I;
    const float *h1 = h + (size_t)(r0 + (nr > 1 ? 1 : 0)) * I;
    const float *h2 = h + (size_t)(r0 + (nr > 2 ? 2 : nr - 1)) * I;
    const float *h3 = h + (size_t)(r0 + (nr > 3 ? 3 : nr - 1)) * I;
    v8 ba = bias ? LD(bias + ja) : bc(0.0f), bb = bias ? LD(bias + jb) : bc(0.0f);
    v8 a0 = ba, a1 = ba, a2 = ba, a3 = ba, e0 = bb, e1 = bb, e2 = bb, e3 = bb;
    for (int i = 0; i < I; i++) {
        const float *w = W + (size_t)i * O;
        v8 wa = LD(w + ja), wb = LD(w + jb);
        v8 x0 = bc(h0[i]), x1 = bc(h1[i]), x2 = bc(h2[i]), x3 = bc(h3[i]);
        a0 += x0 * wa; e0 += x0 * wb;
        a1 += x1 * wa; e1 += x1 * wb;
        a2 += x2 * wa; e2 += x2 * wb;
        a3 += x3 * wa; e3 += x3 * wb;
    }
    if (relu) {
        a0 = relu8(a0); a1 = relu8(a1); a2 = relu8(a2); a3 = relu8(a3);
        e0 = relu8(e0); e1 = relu8(e1); e2 = relu8(e2); e3 = relu8(e3);
    }
    v8 as[4] = {a0, a1, a2, a3}, es[4] = {e0, e1, e2, e3};
    for (int r = 0; r < nr; r++) {
        float *o = out + (size_t)(r0 + r) * O;
        ST(o + ja, as[r]);
        ST(o + jb, es[r]);
    }
}

/* out (n x O) = h (n x I) W (I x O) + bias, then ReLU when `relu`. */
static void linear_fwd(int n, int I, int O, const float *h, const float *W, const float *bias,
                       float *out, int relu) {
    if (O < 8) { /* narrower than one vector: plain loops */
        for (int r = 0; r < n; r++)
            for (int j = 0; j < O; j++) {
                float a = bias ? bias[j] : 0.0f;
                for (int i = 0; i < I; i++) a += h[(size_t)r * I + i] * W[(size_t)i * O + j];
                out[(size_t)r * O + j] = relu && a < 0.0f ? 0.0f : a;
            }
        return;
    }
    /* Strips of 16 columns; the last strip ends at column O, overlapping the one before. */
    for (int j = 0; j < O; j += 16) {
        int ja = j, jb = j + 8;
        if (j + 16 > O) {
            ja = O >= 16 ? O - 16 : 0;
            jb = O - 8;
        }
        for (int r0 = 0; r0 < n; r0 += 4) fwd_block(n, I, O, h, W, bias, out, relu, r0, ja, jb);
    }
}

/* One heavy-ball step of a parameter row p (len entries) with gradient row gr:
 * grad = gr + wd p; v = m v + grad; p -= lr v (m = 0: p -= lr grad, no buffer). */
static inline void update_row(int len, float *p, float *v, const float *gr, float lr, float m,
                              float wd) {
    int j = 0;
    if (v) {
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
        for (; j + 8 <= len; j += 8) {
            v8 pj = LD(p + j);
            ST(p + j, pj - bc(lr) * (LD(gr + j) + bc(wd) * pj));
        }
        for (; j < len; j++) p[j] -= lr * (gr[j] + wd * p[j]);
    }
}

/* The backward pass and update of one layer. h (n x I): its input; g (n x O): the loss's
 * gradient at its output. When dx is given: dx (n x I) = g W^T where h > 0, else 0, with
 * the weights before the update. Then W (I x O) and bias (O) take one step (heavy ball with
 * L2; V, vb NULL: plain SGD). row: O floats of scratch. Each row of W is read once from
 * memory: its input gradient, weight gradient and update are computed while it is in L1
 * (rows of h and g in blocks of 4; the weight gradient is carried between blocks in `row`
 * and the update is made in the last block). */
static void linear_bwd_update(int n, int I, int O, const float *h, const float *g, float *W,
                              float *V, float *bias, float *vb, float *dx, float lr, float m,
                              float wd, float *row) {
    int O8 = O - O % 8;
    v8 vm = bc(m), vwd = bc(wd), vlr = bc(lr);
    for (int i = 0; i < I; i++) {
        float *w = W + (size_t)i * O, *v = V ? V + (size_t)i * O : NULL;
        for (int r0 = 0; r0 < n; r0 += 4) {
            int nr = n - r0 < 4 ? n - r0 : 4, last = r0 + 4 >= n;
            const float *g0 = g + (size_t)r0 * O;
            const float *g1 = nr > 1 ? g0 + O : g0, *g2 = nr > 2 ? g0 + 2 * O : g0;
            const float *g3 = nr > 3 ? g0 + 3 * O : g0;
            /* Rows beyond n count with weight 0 in the weight gradient. */
            float x0 = h[(size_t)r0 * I + i];
            float x1 = nr > 1 ? h[(size_t)(r0 + 1) * I + i] : 0.0f;
            float x2 = nr > 2 ? h[(size_t)(r0 + 2) * I + i] : 0.0f;
            float x3 = nr > 3 ? h[(size_t)(r0 + 3) * I + i] : 0.0f;
            v8 c0 = bc(x0), c1 = bc(x1), c2 = bc(x2), c3 = bc(x3);
            v8 d0 = bc(0.0f), d1 = d0, d2 = d0, d3 = d0;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            int j = 0;
            for (; j < O8; j += 8) {
                v8 wj = LD(w + j), q0 = LD(g0 + j), q1 = LD(g1 + j), q2 = LD(g2 + j),
                   q3 = LD(g3 + j);
                if (dx) {
                    d0 += q0 * wj; d1 += q1 * wj; d2 += q2 * wj; d3 += q3 * wj;
                }
                v8 acc = r0 ? LD(row + j) : bc(0.0f);
                acc += c0 * q0 + c1 * q1 + c2 * q2 + c3 * q3;
                if (!last) {
                    ST(row + j, acc);
                } else if (v) {
                    v8 vj = vm * LD(v + j) + (acc + vwd * wj);
                    ST(v + j, vj);
                    ST(w + j, wj - vlr * vj);
                } else {
                    ST(w + j, wj - vlr * (acc + vwd * wj));
                }
            }
            for (; j < O; j++) {
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
                float s[4] = {hsum(d0) + s0, hsum(d1) + s1, hsum(d2) + s2, hsum(d3) + s3};
                for (int r = 0; r < nr; r++) {
                    size_t at = (size_t)(r0 + r) * I + i;
                    dx[at] = h[at] > 0.0f ? s[r] : 0.0f;
                }
            }
        }
    }
    if (bias) {
        for (int j = 0; j < O; j++) row[j] = 0.0f;
        for (int r = 0; r < n; r++)
            for (int j = 0; j < O; j++) row[j] += g[(size_t)r * O + j];
        update_row(O, bias, vb, row, lr, m, wd);
    }
}

/* Workspace floats one member needs: every hidden layer's output and the probabilities. */
static size_t member_ws(int n, int L, const int64_t *dims) {
    size_t s = 0;
    for (int l = 1; l <= L; l++) s += (size_t)n * dims[l];
    return s;
}

/* Forward: each member's mean cross-entropy into losses (K). dims: L + 1 layer widths.
 * ws: K * member_ws + scratch (see sgdn_mlp_ws_floats). */
void sgdn_mlp_forward(int K, int n, int L, const int64_t *dims, float *const *W,
                      float *const *b, const float *x, const int64_t *y, float *ws,
                      float *losses) {
    size_t per = member_ws(n, L, dims);
    int C = (int)dims[L];
    for (int k = 0; k < K; k++) {
        float *mine = ws + (size_t)k * per;
        const float *h = x + (size_t)k * n * dims[0];
        for (int l = 0; l < L; l++) {
            int I = (int)dims[l], O = (int)dims[l + 1];
            const float *Wk = W[l] + (size_t)k * I * O;
            const float *bk = b[l] ? b[l] + (size_t)k * O : NULL;
            linear_fwd(n, I, O, h, Wk, bk, mine, l < L - 1);
            h = mine;
            mine += (size_t)n * O;
        }
        /* h: logits (n x C) -> probabilities in place; the loss from log-sum-exp. */
        float *z = (float *)h;
        float total = 0.0f;
        for (int r = 0; r < n; r++) {
            float *zr = z + (size_t)r * C;
            float mx = zr[0];
            for (int c = 1; c < C; c++) mx = zr[c] > mx ? zr[c] : mx;
            float s = 0.0f;
            for (int c = 0; c < C; c++) s += expf(zr[c] - mx);
            float lse = mx + logf(s);
            total += lse - zr[y[(size_t)k * n + r]];
            for (int c = 0; c < C; c++) zr[c] = expf(zr[c] - lse);
        }
        losses[k] = total / (float)n;
    }
}

/* Backward and update after sgdn_mlp_forward on the same x, y, ws: member k's parameters
 * W, b (and momentum buffers V, vb when m != 0) take one step with learning rate lrs[k]. */
void sgdn_mlp_backward_update(int K, int n, int L, const int64_t *dims, float *const *W,
                              float *const *b, float *const *V, float *const *vb,
                              const float *x, const int64_t *y, float *ws, const float *lrs,
                              float m, float wd) {
    size_t per = member_ws(n, L, dims);
    int widest = 0;
    for (int l = 0; l <= L; l++) widest = dims[l] > widest ? (int)dims[l] : widest;
    float *scratch = ws + (size_t)K * per;
    float *ga = scratch, *gb = ga + (size_t)n * widest, *row = gb + (size_t)n * widest;
    int C = (int)dims[L];
    for (int k = 0; k < K; k++) {
        float *mine = ws + (size_t)k * per;
        /* Inputs of each layer: x, then the hidden outputs in order; probabilities last. */
        const float *ins[64];
        ins[0] = x + (size_t)k * n * dims[0];
        float *at = mine;
        for (int l = 1; l < L; l++) {
            ins[l] = at;
            at += (size_t)n * dims[l];
        }
        const float *p = at;
        float inv = 1.0f / (float)n;
        for (int r = 0; r < n; r++)
            for (int c = 0; c < C; c++)
                ga[(size_t)r * C + c] =
                    (p[(size_t)r * C + c] - (c == y[(size_t)k * n + r] ? 1.0f : 0.0f)) * inv;
        float *g = ga, *spare = gb;
        for (int l = L - 1; l >= 0; l--) {
            int I = (int)dims[l], O = (int)dims[l + 1];
            size_t wo = (size_t)k * I * O;
            float *Vk = m != 0.0f ? V[l] + wo : NULL;
            float *bk = b[l] ? b[l] + (size_t)k * O : NULL;
            float *vbk = m != 0.0f && b[l] ? vb[l] + (size_t)k * O : NULL;
            linear_bwd_update(n, I, O, ins[l], g, W[l] + wo, Vk, bk, vbk, l > 0 ? spare : NULL,
                              lrs[k], m, wd, row);
            float *t = g;
            g = spare;
            spare = t;
        }
    }
}

/* Floats of workspace the two calls need for K members of n rows. */
int64_t sgdn_mlp_ws_floats(int K, int n, int L, const int64_t *dims) {
    int widest = 0;
    for (int l = 0; l <= L; l++) widest = dims[l] > widest ? (int)dims[l] : widest;
    return (int64_t)K * (int64_t)member_ws(n, L, dims) + 2 * (int64_t)n * widest + widest;
}
