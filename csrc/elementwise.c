/* elementwise.c: relu, addition, bias add and column sums, embedding gather / scatter-add.
 * Memory-bound loops: vectorized by the compiler, parallel only where the arrays are large. */
#include "simd.h"

#define PAR_MIN 32768 /* below this many elements a parallel region costs more than it saves */

void rg_relu_forward(float *out, const float *x, size_t n) {
    #pragma omp parallel for num_threads(rg_num_threads()) if (n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        out[i] = v > 0.0f ? v : 0.0f;
    }
}

void rg_relu_backward(float *dx, const float *dout, const float *out, size_t n) {
    /* forward: out = max(x, 0), so dx = dout * [out > 0]; both loads unconditional, so the
     * select vectorizes instead of branching on random signs */
    #pragma omp parallel for num_threads(rg_num_threads()) if (n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float d = dout[i];
        dx[i] = out[i] > 0.0f ? d : 0.0f;
    }
}

void rg_add(float *out, const float *a, const float *b, size_t n) {
    #pragma omp parallel for num_threads(rg_num_threads()) if (n >= PAR_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void rg_bias_add(float *x, const float *b, int N, int C) {
    #pragma omp parallel for num_threads(rg_num_threads()) if ((size_t)N * C >= PAR_MIN) \
        schedule(static)
    for (int i = 0; i < N; i++) {
        float *x_i = x + (size_t)i * C;
        for (int c = 0; c < C; c++) x_i[c] += b[c];
    }
}

void rg_colsum(float *db, const float *dy, int N, int C, int accumulate) {
    /* parallel over column blocks: each thread owns its columns of db, no reduction needed */
    #pragma omp parallel for num_threads(rg_num_threads()) if ((size_t)N * C >= PAR_MIN) \
        schedule(static)
    for (int c0 = 0; c0 < C; c0 += 64) {
        int c1 = c0 + 64 < C ? c0 + 64 : C;
        if (!accumulate) memset(db + c0, 0, (size_t)(c1 - c0) * sizeof(float));
        for (int i = 0; i < N; i++) {
            const float *dy_i = dy + (size_t)i * C;
            for (int c = c0; c < c1; c++) db[c] += dy_i[c];
        }
    }
}

void rg_embedding_forward(float *out, const int *ids, const float *wte, const float *wpe,
                          int B, int T, int D) {
    #pragma omp parallel for num_threads(rg_num_threads()) if ((size_t)B * T * D >= PAR_MIN) \
        schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        const float *wte_i = wte + (size_t)ids[bt] * D;
        const float *wpe_t = wpe + (size_t)(bt % T) * D;
        float *out_bt = out + (size_t)bt * D;
        for (int d = 0; d < D; d++) out_bt[d] = wte_i[d] + wpe_t[d];
    }
}

void rg_embedding_backward(float *dwte, float *dwpe, const float *dout, const int *ids,
                           int B, int T, int D, int V, int Tmax, int accumulate) {
    if (!accumulate) {
        memset(dwte, 0, (size_t)V * D * sizeof(float));
        memset(dwpe, 0, (size_t)Tmax * D * sizeof(float));
    }
    /* Repeated ids add into the same row of dwte, so rows cannot be split between threads;
     * columns can: each thread owns a block of columns of dwte and dwpe. */
    #pragma omp parallel for num_threads(rg_num_threads()) if ((size_t)B * T * D >= PAR_MIN) \
        schedule(static)
    for (int d0 = 0; d0 < D; d0 += 32) {
        int d1 = d0 + 32 < D ? d0 + 32 : D;
        for (int bt = 0; bt < B * T; bt++) {
            const float *dout_bt = dout + (size_t)bt * D;
            float *dwte_i = dwte + (size_t)ids[bt] * D;
            float *dwpe_t = dwpe + (size_t)(bt % T) * D;
            for (int d = d0; d < d1; d++) {
                dwte_i[d] += dout_bt[d];
                dwpe_t[d] += dout_bt[d];
            }
        }
    }
}
