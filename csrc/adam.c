/* adam.c: the fused Adam / AdamW update over the model's one flat parameter buffer, and
 * the gradient norm its clipping needs; vectorized in three SIMD variants, threads over
 * contiguous chunks. */
#include "simd.h"

#define PAR_MIN 65536 /* elements below which one thread does it all */

typedef struct {
    float b1, b2, a1, a2;             /* beta1, beta2, 1 - beta1, 1 - beta2 */
    float c1, c2;                     /* bias corrections 1 / (1 - beta^t) */
    float lr, eps, decay, grad_scale; /* decay = lr * weight_decay */
} adam_consts;

/* Elements [i0, i1) of the update. */
RG_INLINE void update(int wide, float *restrict params, float *restrict m, float *restrict v,
                      const float *restrict grads, size_t i0, size_t i1, const adam_consts *k) {
    (void)wide;
    const float b1 = k->b1, b2 = k->b2, a1 = k->a1, a2 = k->a2, c1 = k->c1, c2 = k->c2;
    const float lr = k->lr, eps = k->eps, decay = k->decay, grad_scale = k->grad_scale;
    #pragma omp simd
    for (size_t i = i0; i < i1; i++) {
        float g = grads[i] * grad_scale;
        float m_i = b1 * m[i] + a1 * g;
        float v_i = b2 * v[i] + a2 * g * g;
        m[i] = m_i;
        v[i] = v_i;
        params[i] -= lr * (m_i * c1) / (sqrtf(v_i * c2) + eps) + decay * params[i];
    }
}
RG_VARIANTS(update, (float *restrict params, float *restrict m, float *restrict v,
                     const float *restrict grads, size_t i0, size_t i1, const adam_consts *k),
            (params, m, v, grads, i0, i1, k))

typedef float f32x8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float f32x4 __attribute__((vector_size(16), aligned(4), may_alias));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));

/* Sum of squares of x[i0, i1) in double: four vectors of accumulators (written as vectors:
 * GCC leaves the scalar form of this reduction unvectorized), eight doubles wide on
 * AVX-512 and four elsewhere, then one fixed-order sum of their lanes. */
#define SUM_SQUARES_BODY(F, D, W)                                                   \
    {                                                                               \
        D acc[4] = {{0.0}};                                                         \
        for (; i + 4 * W <= i1; i += 4 * W)                                         \
            for (int u = 0; u < 4; u++) {                                           \
                D d = __builtin_convertvector(*(const F *)(x + i + W * u), D);      \
                acc[u] += d * d;                                                    \
            }                                                                       \
        D sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);                              \
        for (int j = 0; j < W; j++) total += sum[j];                                \
    }
RG_INLINE void sum_squares_range(int wide, double *out, const float *x, size_t i0, size_t i1) {
    double total = 0.0;
    size_t i = i0;
    if (wide)
        SUM_SQUARES_BODY(f32x8, f64x8, 8)
    else
        SUM_SQUARES_BODY(f32x4, f64x4, 4)
    for (; i < i1; i++) total += (double)x[i] * x[i];
    *out = total;
}
RG_VARIANTS(sum_squares_range, (double *out, const float *x, size_t i0, size_t i1),
            (out, x, i0, i1))

/* The sum of squares is taken over fixed chunks of the buffer and the chunks' sums are
 * added in order, so the total does not depend on the thread count (nor, through the
 * gradient clipping, anything a training step computes). A chunk is 16K elements or more,
 * a multiple of 16 (every vector loop but the last chunk's runs whole), at most MAX_CHUNKS
 * of them; threads take runs of whole chunks, the same ones in both loops of the update. */
#define MIN_CHUNK 16384
#define MAX_CHUNKS 4096

static size_t chunk_size(size_t n) {
    size_t c = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
    c = (c + 15) / 16 * 16;
    return c > MIN_CHUNK ? c : MIN_CHUNK;
}

/* End of chunk c: its start plus chunk, or n for the last one. */
static size_t chunk_end(int c, size_t chunk, size_t n) {
    size_t end = (size_t)(c + 1) * chunk;
    return end < n ? end : n;
}

/* parts[0] + ... + parts[count - 1] in that order. */
static double total_of(const double *parts, int count) {
    double total = 0.0;
    for (int c = 0; c < count; c++) total += parts[c];
    return total;
}

double rg_sum_squares(const float *x, size_t n) {
    void (*sq)(double *, const float *, size_t, size_t) = sum_squares_range_pick();
    size_t chunk = chunk_size(n);
    int count = (int)((n + chunk - 1) / chunk), nt = n >= PAR_MIN ? rg_num_threads() : 1;
    double parts[MAX_CHUNKS];
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < count; c++)
        sq(&parts[c], x, c * chunk, chunk_end(c, chunk, n));
    return total_of(parts, count);
}

double rg_adam_update(float *params, float *m, float *v, const float *grads, size_t n,
                      double lr, double beta1, double beta2, double eps,
                      double weight_decay, int t, double max_norm) {
    /* One parallel region, two loops with the same static schedule: each thread updates
     * the chunks whose squares it summed, while that part of grads is still in its cache. */
    void (*sq)(double *, const float *, size_t, size_t) = sum_squares_range_pick();
    void (*f)(float *restrict, float *restrict, float *restrict, const float *restrict, size_t,
              size_t, const adam_consts *) = update_pick();
    size_t chunk = chunk_size(n);
    int count = (int)((n + chunk - 1) / chunk), nt = n >= PAR_MIN ? rg_num_threads() : 1;
    double parts[MAX_CHUNKS], norm = 0.0;
    /* constants in double, then rounded once: 1 - beta2 in float32 would be 1.3e-5 off */
    adam_consts k = {(float)beta1, (float)beta2, (float)(1.0 - beta1), (float)(1.0 - beta2),
                     (float)(1.0 / (1.0 - pow(beta1, t))), (float)(1.0 / (1.0 - pow(beta2, t))),
                     (float)lr, (float)eps, (float)(lr * weight_decay), 1.0f};
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp for schedule(static)
        for (int c = 0; c < count; c++)
            sq(&parts[c], grads, c * chunk, chunk_end(c, chunk, n));
        #pragma omp single
        {
            norm = sqrt(total_of(parts, count));
            if (max_norm > 0.0 && norm > max_norm) k.grad_scale = (float)(max_norm / norm);
        }
        if (isfinite(norm)) {
            #pragma omp for schedule(static)
            for (int c = 0; c < count; c++)
                f(params, m, v, grads, c * chunk, chunk_end(c, chunk, n), &k);
        }
    }
    return norm;
}
