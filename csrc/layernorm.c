/* layernorm.c: layer norm forward and backward, row by row (post-norm blocks, as RustGPT). */
#include <math.h>
#include "rustgpt_kernels.h"

void rg_layernorm_forward(float *out, float *mean, float *rstd, const float *x,
                          const float *g, const float *b, int N, int D, float eps) {
    #pragma omp parallel for if ((size_t)N * D >= 32768) schedule(static)
    for (int i = 0; i < N; i++) {
        const float *x_i = x + (size_t)i * D;
        float *out_i = out + (size_t)i * D;
        float mu = 0.0f;
        for (int d = 0; d < D; d++) mu += x_i[d];
        mu /= D;
        float var = 0.0f; /* two passes: stable when |mean| >> std */
        for (int d = 0; d < D; d++) {
            float xm = x_i[d] - mu;
            var += xm * xm;
        }
        var /= D;
        float rs = 1.0f / sqrtf(var + eps);
        for (int d = 0; d < D; d++) out_i[d] = (x_i[d] - mu) * rs * g[d] + b[d];
        mean[i] = mu;
        rstd[i] = rs;
    }
}

void rg_layernorm_backward(float *dx, float *dg, float *db, const float *dout,
                           const float *x, const float *g, const float *mean,
                           const float *rstd, int N, int D) {
    /* forward: xhat = (x - mean) * rstd, out = xhat * g + b, so
     *   db += dout,  dg += dout * xhat,
     *   dx  = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * g.
     * dg, db sum over rows: that loop runs first, parallel over column blocks (dx may alias
     * dout, so dout must be read before dx is written). */
    #pragma omp parallel for if ((size_t)N * D >= 32768) schedule(static)
    for (int d0 = 0; d0 < D; d0 += 64) {
        int d1 = d0 + 64 < D ? d0 + 64 : D;
        for (int i = 0; i < N; i++) {
            const float *x_i = x + (size_t)i * D;
            const float *dout_i = dout + (size_t)i * D;
            for (int d = d0; d < d1; d++) {
                db[d] += dout_i[d];
                dg[d] += dout_i[d] * (x_i[d] - mean[i]) * rstd[i];
            }
        }
    }
    #pragma omp parallel for if ((size_t)N * D >= 32768) schedule(static)
    for (int i = 0; i < N; i++) {
        const float *x_i = x + (size_t)i * D;
        const float *dout_i = dout + (size_t)i * D;
        float *dx_i = dx + (size_t)i * D;
        float mu = mean[i], rs = rstd[i];
        float dxhat_mean = 0.0f, dxhat_xhat_mean = 0.0f;
        for (int d = 0; d < D; d++) {
            float dxhat = dout_i[d] * g[d];
            dxhat_mean += dxhat;
            dxhat_xhat_mean += dxhat * (x_i[d] - mu) * rs;
        }
        dxhat_mean /= D;
        dxhat_xhat_mean /= D;
        for (int d = 0; d < D; d++) {
            float xhat = (x_i[d] - mu) * rs;
            dx_i[d] = rs * (dout_i[d] * g[d] - dxhat_mean - xhat * dxhat_xhat_mean);
        }
    }
}
