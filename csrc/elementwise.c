/* elementwise.c: relu, GELU, dropout, addition, bias add and column sums, embedding gather /
 * scatter-add. Memory-bound loops (GELU's excepted): vectorized by the compiler, parallel
 * only where the arrays are large. */
#include "simd.h"

#define PAR_MIN 32768 /* below this many elements a parallel region costs more than it saves */
#define GELU_PAR_MIN 4096 /* GELU does some 40 operations an element: worth threads sooner */

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

/* Elements [i0, i1) of GELU's forward (out = gelu(x)) or, with dout, its backward
 * (out = dout * gelu'(x)), in three SIMD variants. */
RG_INLINE void gelu_span(int wide, float *out, const float *dout, const float *x, size_t i0,
                         size_t i1) {
    (void)wide;
    if (dout) {
        #pragma omp simd
        for (size_t i = i0; i < i1; i++) out[i] = dout[i] * rg_gelu_grad(x[i]);
    } else {
        #pragma omp simd
        for (size_t i = i0; i < i1; i++) out[i] = rg_gelu(x[i]);
    }
}
RG_VARIANTS(gelu_span, (float *out, const float *dout, const float *x, size_t i0, size_t i1),
            (out, dout, x, i0, i1))

static void gelu_run(float *out, const float *dout, const float *x, size_t n) {
    void (*f)(float *, const float *, const float *, size_t, size_t) = gelu_span_pick();
    int nt = n >= GELU_PAR_MIN ? rg_num_threads() : 1;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < nt; c++) f(out, dout, x, n * c / nt, n * (c + 1) / nt);
}

void rg_gelu_forward(float *out, const float *x, size_t n) { gelu_run(out, NULL, x, n); }

void rg_gelu_backward(float *dx, const float *dout, const float *x, size_t n) {
    gelu_run(dx, dout, x, n);
}

/* lowbias32 (Chris Wellons' 32-bit integer hash): a bijection that mixes every input bit
 * into every output bit, two multiplies, so a loop of it vectorizes. */
RG_INLINE unsigned hash32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* Elements [i0, i1) of dropout: element i is kept when hash32(hash32(first + i) ^ key) >=
 * drop (32-bit counters). */
RG_INLINE void dropout_span(int wide, float *out, const float *x, size_t i0, size_t i1,
                            unsigned first, unsigned key, unsigned drop, float scale) {
    (void)wide;
    #pragma omp simd
    for (size_t i = i0; i < i1; i++)
        out[i] = rg_select(hash32(hash32(first + (unsigned)i) ^ key) >= drop, x[i] * scale,
                           0.0f);
}
RG_VARIANTS(dropout_span, (float *out, const float *x, size_t i0, size_t i1, unsigned first,
                           unsigned key, unsigned drop, float scale),
            (out, x, i0, i1, first, key, drop, scale))

void rg_dropout(float *out, const float *x, size_t n, size_t row, float p, const int *seed,
                int site) {
    /* one key per (seed, site); p * 2^32 of the 2^32 hash values drop an element */
    unsigned key = hash32(hash32((unsigned)seed[0] + 0x9e3779b9U * (unsigned)site)
                          ^ (unsigned)seed[1]);
    unsigned drop = (unsigned)((double)p * 4294967296.0);
    float scale = 1.0f / (1.0f - p);
    unsigned first = (unsigned)((size_t)(unsigned)seed[2] * row);  /* the row's first element */
    void (*f)(float *, const float *, size_t, size_t, unsigned, unsigned, unsigned, float) =
        dropout_span_pick();
    int nt = n >= PAR_MIN ? rg_num_threads() : 1;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < nt; c++)
        f(out, x, n * c / nt, n * (c + 1) / nt, first, key, drop, scale);
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

/* db[c0:c1] (+)= the sums of dy's columns c0..c1-1 over its N rows. In blocks of up to
 * COLSUM_W columns whose sums stay in registers while the rows pass (with db[c] += ... the
 * compiler must assume db may alias the rows); each sum adds the rows in order. */
#define COLSUM_W 64
RG_INLINE void colsum_cols(int wide, float *db, const float *dy, int N, int C, int c0, int c1,
                           int accumulate) {
    (void)wide;
    for (; c0 < c1; c0 += COLSUM_W) {
        int w = c1 - c0 < COLSUM_W ? c1 - c0 : COLSUM_W;
        float acc[COLSUM_W];
        if (w == COLSUM_W) { /* a constant width, so acc lives in registers */
            for (int c = 0; c < COLSUM_W; c++) acc[c] = accumulate ? db[c0 + c] : 0.0f;
            for (int i = 0; i < N; i++) {
                const float *dy_i = dy + (size_t)i * C + c0;
                #pragma omp simd
                for (int c = 0; c < COLSUM_W; c++) acc[c] += dy_i[c];
            }
        } else {
            for (int c = 0; c < w; c++) acc[c] = accumulate ? db[c0 + c] : 0.0f;
            for (int i = 0; i < N; i++) {
                const float *dy_i = dy + (size_t)i * C + c0;
                for (int c = 0; c < w; c++) acc[c] += dy_i[c];
            }
        }
        memcpy(db + c0, acc, (size_t)w * sizeof(float));
    }
}
RG_VARIANTS(colsum_cols, (float *db, const float *dy, int N, int C, int c0, int c1,
                          int accumulate),
            (db, dy, N, C, c0, c1, accumulate))

void rg_colsum(float *db, const float *dy, int N, int C, int accumulate) {
    /* threads split the column blocks: each owns its columns of db, no reduction needed */
    void (*f)(float *, const float *, int, int, int, int, int) = colsum_cols_pick();
    int blocks = (C + COLSUM_W - 1) / COLSUM_W;
    int nt = (size_t)N * C >= PAR_MIN ? rg_num_threads() : 1;
    if (nt > blocks) nt = blocks;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int t = 0; t < nt; t++) {
        int c0 = (int)((long)blocks * t / nt) * COLSUM_W;
        int c1 = (int)((long)blocks * (t + 1) / nt) * COLSUM_W;
        f(db, dy, N, C, c0, c1 < C ? c1 : C, accumulate);
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
                           int B, int T, int D, int V, int Tmax, int accumulate_wte,
                           int accumulate_wpe) {
    if (!accumulate_wte) memset(dwte, 0, (size_t)V * D * sizeof(float));
    if (!accumulate_wpe) memset(dwpe, 0, (size_t)Tmax * D * sizeof(float));
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
