/* layernorm.c: layer norm forward and backward, row by row, with or without the bias b.
 * Row loops vectorized in three SIMD variants; threads split the rows. */
#include "simd.h"

/* Rows [i0, i1) of the forward. */
RG_INLINE void forward_rows(int wide, float *out, float *mean, float *rstd, const float *x,
                            const float *g, const float *b, int i0, int i1, int D, float eps) {
    (void)wide;
    for (int i = i0; i < i1; i++) {
        const float *x_i = x + (size_t)i * D;
        float *out_i = out + (size_t)i * D;
        float mu = 0.0f, var = 0.0f;
        #pragma omp simd reduction(+ : mu)
        for (int d = 0; d < D; d++) mu += x_i[d];
        mu /= D;
        #pragma omp simd reduction(+ : var)
        for (int d = 0; d < D; d++) var += (x_i[d] - mu) * (x_i[d] - mu); /* two passes: stable */
        float rs = 1.0f / sqrtf(var / D + eps);
        if (b) {
            #pragma omp simd
            for (int d = 0; d < D; d++) out_i[d] = (x_i[d] - mu) * rs * g[d] + b[d];
        } else {
            #pragma omp simd
            for (int d = 0; d < D; d++) out_i[d] = (x_i[d] - mu) * rs * g[d];
        }
        mean[i] = mu;
        rstd[i] = rs;
    }
}
RG_VARIANTS(forward_rows, (float *out, float *mean, float *rstd, const float *x,
                           const float *g, const float *b, int i0, int i1, int D, float eps),
            (out, mean, rstd, x, g, b, i0, i1, D, eps))

/* Columns [d0, d1) of dg and db (NULL: not wanted): sums over all N rows, added to them
 * when accumulate. In
 * blocks of up to PG_W columns whose sums stay in registers while the rows pass (the
 * compiler cannot keep dg[d] += ... there: dg might alias the rows); rows added in order. */
#define PG_W 64
RG_INLINE void param_grads(int wide, float *dg, float *db, const float *dout, const float *x,
                           const float *mean, const float *rstd, int N, int D, int d0, int d1,
                           int accumulate) {
    (void)wide;
    for (; d0 < d1; d0 += PG_W) {
        int w = d1 - d0 < PG_W ? d1 - d0 : PG_W;
        float sg[PG_W], sb[PG_W];
        for (int c = 0; c < w; c++) {
            sg[c] = accumulate ? dg[d0 + c] : 0.0f;
            sb[c] = accumulate && db ? db[d0 + c] : 0.0f;
        }
        for (int i = 0; i < N; i++) {
            const float *x_i = x + (size_t)i * D + d0, *dout_i = dout + (size_t)i * D + d0;
            float mu = mean[i], rs = rstd[i];
            if (w == PG_W) { /* a constant width, so the sums live in registers */
                #pragma omp simd
                for (int c = 0; c < PG_W; c++) {
                    sb[c] += dout_i[c];
                    sg[c] += dout_i[c] * (x_i[c] - mu) * rs;
                }
            } else {
                for (int c = 0; c < w; c++) {
                    sb[c] += dout_i[c];
                    sg[c] += dout_i[c] * (x_i[c] - mu) * rs;
                }
            }
        }
        memcpy(dg + d0, sg, (size_t)w * sizeof(float));
        if (db) memcpy(db + d0, sb, (size_t)w * sizeof(float));
    }
}
RG_VARIANTS(param_grads, (float *dg, float *db, const float *dout, const float *x,
                          const float *mean, const float *rstd, int N, int D, int d0, int d1,
                          int accumulate),
            (dg, db, dout, x, mean, rstd, N, D, d0, d1, accumulate))

/* Rows [i0, i1) of dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)). */
RG_INLINE void input_grads(int wide, float *dx, const float *dout, const float *x,
                           const float *g, const float *mean, const float *rstd, int i0,
                           int i1, int D) {
    (void)wide;
    for (int i = i0; i < i1; i++) {
        const float *x_i = x + (size_t)i * D, *dout_i = dout + (size_t)i * D;
        float *dx_i = dx + (size_t)i * D;
        float mu = mean[i], rs = rstd[i], m1 = 0.0f, m2 = 0.0f;
        #pragma omp simd reduction(+ : m1, m2)
        for (int d = 0; d < D; d++) {
            float dxhat = dout_i[d] * g[d];
            m1 += dxhat;
            m2 += dxhat * (x_i[d] - mu) * rs;
        }
        m1 /= D;
        m2 /= D;
        #pragma omp simd
        for (int d = 0; d < D; d++)
            dx_i[d] = rs * (dout_i[d] * g[d] - m1 - (x_i[d] - mu) * rs * m2);
    }
}
RG_VARIANTS(input_grads, (float *dx, const float *dout, const float *x, const float *g,
                          const float *mean, const float *rstd, int i0, int i1, int D),
            (dx, dout, x, g, mean, rstd, i0, i1, D))

/* threads worth using for n elements of row work */
static int threads_for(size_t n) { return n >= 32768 ? rg_num_threads() : 1; }

void rg_layernorm_forward(float *out, float *mean, float *rstd, const float *x,
                          const float *g, const float *b, int N, int D, float eps) {
    void (*f)(float *, float *, float *, const float *, const float *, const float *, int,
              int, int, float) = forward_rows_pick();
    int nt = threads_for((size_t)N * D);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < nt; c++)
        f(out, mean, rstd, x, g, b, (int)((long)N * c / nt), (int)((long)N * (c + 1) / nt),
          D, eps);
}

void rg_layernorm_backward(float *dx, float *dg, float *db, const float *dout,
                           const float *x, const float *g, const float *mean,
                           const float *rstd, int N, int D, int accumulate) {
    /* forward: xhat = (x - mean) * rstd, out = xhat * g + b, so db += dout,
     * dg += dout * xhat. Those sums over rows run first, split by columns (dx may alias
     * dout, so dout is read before dx is written); then dx, split by rows. */
    void (*pg)(float *, float *, const float *, const float *, const float *, const float *,
               int, int, int, int, int) = param_grads_pick();
    void (*ig)(float *, const float *, const float *, const float *, const float *,
               const float *, int, int, int) = input_grads_pick();
    int nt = threads_for((size_t)N * D);
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp for schedule(static)
        for (int c = 0; c < nt; c++)
            pg(dg, db, dout, x, mean, rstd, N, D, (int)((long)D * c / nt / 16 * 16),
               c + 1 == nt ? D : (int)((long)D * (c + 1) / nt / 16 * 16), accumulate);
        #pragma omp for schedule(static)
        for (int c = 0; c < nt; c++)
            ig(dx, dout, x, g, mean, rstd, (int)((long)N * c / nt),
               (int)((long)N * (c + 1) / nt), D);
    }
}
