/* The exact NQM recursion of sgdnoise.theory.nqm (its _sgd_loop and _momentum_loop), one
 * call for the whole run instead of some twenty numpy operations per step.
 *
 * Every elementwise operation is the one numpy performs, in the same order, compiled with
 * -ffp-contract=off, so the second moments are numpy's to the bit. The recorded loss
 * sum_i (h_i / 2) P_i is summed in index order (numpy's dot product sums in blocks), so it
 * agrees to rounding.
 *
 * Returns the last record slot written (curve[0] is the caller's); a non-finite loss fills
 * the rest of the curve with +inf and stops, as does a loss <= stop_at when has_stop.
 */
#include <math.h>
#include <stdint.h>

static int record(double *curve, int64_t k, int64_t slots, double loss, int has_stop,
                  double stop_at) {
    if (!isfinite(loss)) {
        for (int64_t j = k; j < slots; j++) curve[j] = INFINITY;
        return 1;
    }
    curve[k] = loss;
    return has_stop && loss <= stop_at;
}

/* sum_i half_h[i] p[i] in eight interleaved partial sums (a single running sum would wait
 * on each addition in turn). */
static double loss_of(int64_t d, const double *half_h, const double *p) {
    double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) part[j] += half_h[i + j] * p[i + j];
    double total = ((part[0] + part[1]) + (part[2] + part[3])) +
                   ((part[4] + part[5]) + (part[6] + part[7]));
    for (; i < d; i++) total += half_h[i] * p[i];
    return total;
}

/* P <- (1 - alpha h)^2 P + alpha^2 s. decay, noise: d doubles of scratch. */
int64_t sgdn_nqm_sgd(int64_t d, double *p, const double *h, const double *s,
                     const double *half_h, const double *alphas, int64_t n_steps,
                     int64_t record_every, double *curve, int64_t slots, int has_stop,
                     double stop_at, double *decay, double *noise) {
    int64_t k = 0;
    double prev = NAN;
    for (int64_t t = 0; t < n_steps; t++) {
        double alpha = alphas[t];
        if (!(alpha == prev)) {
            for (int64_t i = 0; i < d; i++) {
                double a = 1.0 - alpha * h[i];
                decay[i] = a * a;
                noise[i] = (alpha * alpha) * s[i];
            }
            prev = alpha;
        }
        for (int64_t i = 0; i < d; i++) p[i] = p[i] * decay[i] + noise[i];
        int64_t t1 = t + 1;
        if (t1 % record_every == 0 || t1 == n_steps) {
            k++;
            if (record(curve, k, slots, loss_of(d, half_h, p), has_stop, stop_at)) return k;
        }
    }
    return k;
}

/* Heavy ball's second moments (P, Q, R) = (E[theta^2], E[theta v], E[v^2]). The
 * alpha-dependent coefficients are recomputed in the loop from h and s (the same operations
 * as numpy's arrays of them, so the same values): less memory to stream than six arrays. */
int64_t sgdn_nqm_momentum(int64_t d, double *p, double *q, double *r, const double *h,
                          const double *s, const double *half_h, const double *alphas,
                          int64_t n_steps, double beta, int64_t record_every, double *curve,
                          int64_t slots, int has_stop, double stop_at) {
    double rr = beta * beta, two_beta = 2.0 * beta;
    int64_t k = 0;
    for (int64_t t = 0; t < n_steps; t++) {
        double alpha = alphas[t];
        double c_pq = -2.0 * alpha * beta, pr = pow(alpha * beta, 2.0); /* Python's ** 2 */
        double qr = -alpha * beta * beta, alpha2 = pow(alpha, 2.0), neg_alpha = -alpha;
        for (int64_t i = 0; i < d; i++) {
            double pi = p[i], qi = q[i], ri = r[i], hi = h[i], si = s[i];
            double a = 1.0 - alpha * hi;
            double np_ = (a * a) * pi;
            np_ += (c_pq * a) * qi;
            np_ += ri * pr;
            np_ += alpha2 * si;
            double nq = (a * hi) * pi;
            nq += (beta * (a - alpha * hi)) * qi;
            nq += ri * qr;
            nq += neg_alpha * si;
            double nr = ri * rr;
            nr += (hi * hi) * pi;
            nr += (two_beta * hi) * qi;
            nr += si;
            p[i] = np_;
            q[i] = nq;
            r[i] = nr;
        }
        int64_t t1 = t + 1;
        if (t1 % record_every == 0 || t1 == n_steps) {
            k++;
            if (record(curve, k, slots, loss_of(d, half_h, p), has_stop, stop_at)) return k;
        }
    }
    return k;
}
