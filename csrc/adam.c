/* adam.c: the fused Adam / AdamW update over the model's one flat parameter buffer, and
 * the gradient norm its clipping needs; vectorized in three SIMD variants, threads over
 * contiguous chunks. */
#include <stdlib.h>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define PAR_MIN 65536 /* elements below which one thread does it all */

typedef struct {
    float b1, b2, a1, a2;             /* beta1, beta2, 1 - beta1, 1 - beta2 */
    float c1, c2;                     /* bias corrections 1 / (1 - beta^t) */
    float lr, eps, decay, grad_scale; /* decay = lr * weight_decay */
    const size_t *ranges;             /* (nranges, 2): [start, end) that decay, ascending */
    size_t nranges;
} adam_consts;

/* Elements [i0, i1) of the update, each with weight decay `decay` (k->decay or 0). */
RG_INLINE void update(int wide, float *restrict params, float *restrict m, float *restrict v,
                      const float *restrict grads, size_t i0, size_t i1, const adam_consts *k,
                      float decay) {
    (void)wide;
    const float b1 = k->b1, b2 = k->b2, a1 = k->a1, a2 = k->a2, c1 = k->c1, c2 = k->c2;
    const float lr = k->lr, eps = k->eps, grad_scale = k->grad_scale;
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
                     const float *restrict grads, size_t i0, size_t i1, const adam_consts *k,
                     float decay),
            (params, m, v, grads, i0, i1, k, decay))

typedef void (*update_fn)(float *restrict, float *restrict, float *restrict,
                          const float *restrict, size_t, size_t, const adam_consts *, float);

/* Elements [i0, i1) of the update: the parts inside k's decay ranges with weight decay,
 * the rest without. An element's arithmetic does not depend on where a part starts or
 * ends (the vector loop and its scalar tail compute alike), so any split into pieces
 * gives the same bits. */
static void update_span(update_fn f, float *params, float *m, float *v, const float *grads,
                        size_t i0, size_t i1, const adam_consts *k) {
    if (k->decay == 0.0f) {
        f(params, m, v, grads, i0, i1, k, 0.0f);
        return;
    }
    const size_t *r = k->ranges;
    size_t lo = 0, hi = k->nranges; /* the first range that ends after i0 */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r[2 * mid + 1] <= i0) lo = mid + 1; else hi = mid;
    }
    size_t at = i0;
    for (size_t j = lo; j < k->nranges && r[2 * j] < i1 && at < i1; j++) {
        size_t start = r[2 * j] > at ? r[2 * j] : at;
        size_t end = r[2 * j + 1] < i1 ? r[2 * j + 1] : i1;
        if (start > at) f(params, m, v, grads, at, start, k, 0.0f);
        f(params, m, v, grads, start, end, k, k->decay);
        at = end;
    }
    if (at < i1) f(params, m, v, grads, at, i1, k, 0.0f);
}

typedef float f32x4 __attribute__((vector_size(16), aligned(4), may_alias));
typedef double f64x4 __attribute__((vector_size(32)));

#ifdef RG_X86
/* The AVX-512 loop of sum_squares_range, in intrinsics: GCC 12 compiles a vector
 * conversion of 8 floats to 8 doubles as two 4-wide ones and an insert, which halved its
 * speed. Same sums as the vector form below: four accumulators, fused multiply-adds. */
RG_AVX512 static double sum_squares_wide(const float *x, size_t *at, size_t i1) {
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                      _mm512_setzero_pd()};
    size_t i = *at;
    for (; i + 32 <= i1; i += 32)
        for (int u = 0; u < 4; u++) {
            __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8 * u));
            acc[u] = _mm512_fmadd_pd(d, d, acc[u]);
        }
    double lanes[8], total = 0.0;
    _mm512_storeu_pd(lanes, _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]),
                                          _mm512_add_pd(acc[2], acc[3])));
    for (int j = 0; j < 8; j++) total += lanes[j];
    *at = i;
    return total;
}
#endif

/* Sum of squares of x[i0, i1) in double: four vectors of accumulators (written as vectors:
 * GCC leaves the scalar form of this reduction unvectorized), eight doubles wide on
 * AVX-512 and four elsewhere, then one fixed-order sum of their lanes. */
RG_INLINE void sum_squares_range(int wide, double *out, const float *x, size_t i0, size_t i1) {
    double total = 0.0;
    size_t i = i0;
#ifdef RG_X86
    if (wide) {
        total = sum_squares_wide(x, &i, i1);
    } else
#endif
    {
        f64x4 acc[4] = {{0.0}};
        for (; i + 16 <= i1; i += 16)
            for (int u = 0; u < 4; u++) {
                f64x4 d = __builtin_convertvector(*(const f32x4 *)(x + i + 4 * u), f64x4);
                acc[u] += d * d;
            }
        f64x4 sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (int j = 0; j < 4; j++) total += sum[j];
    }
    for (; i < i1; i++) total += (double)x[i] * x[i];
    *out = total;
    (void)wide;
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

size_t rg_sum_squares_chunk(size_t n) { return chunk_size(n); }

void rg_sum_squares_part(double *part, const float *x, size_t n, int c) {
    size_t chunk = chunk_size(n);
    sum_squares_range_pick()(part, x, c * chunk, chunk_end(c, chunk, n));
}

double rg_sum_squares_total(const double *parts, int count) { return total_of(parts, count); }

/* The update's constants in double, then rounded once (1 - beta2 in float32 would be
 * 1.3e-5 off), with the gradient's scale for clipping to max_norm given its norm. */
static adam_consts constants(double lr, double beta1, double beta2, double eps,
                             double weight_decay, const size_t *decay, size_t ndecay, int t,
                             double max_norm, double norm) {
    adam_consts k = {(float)beta1, (float)beta2, (float)(1.0 - beta1), (float)(1.0 - beta2),
                     (float)(1.0 / (1.0 - pow(beta1, t))), (float)(1.0 / (1.0 - pow(beta2, t))),
                     (float)lr, (float)eps, (float)(lr * weight_decay), 1.0f, decay, ndecay};
    if (max_norm > 0.0 && norm > max_norm) k.grad_scale = (float)(max_norm / norm);
    return k;
}

double rg_adam_update(float *params, float *m, float *v, const float *grads, size_t n,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      const size_t *decay, size_t ndecay, int t, double max_norm) {
    /* One parallel region, two loops with the same static schedule: each thread updates
     * the chunks whose squares it summed, while that part of grads is still in its cache. */
    void (*sq)(double *, const float *, size_t, size_t) = sum_squares_range_pick();
    update_fn f = update_pick();
    size_t chunk = chunk_size(n);
    int count = (int)((n + chunk - 1) / chunk), nt = n >= PAR_MIN ? rg_num_threads() : 1;
    double parts[MAX_CHUNKS], norm = 0.0;
    adam_consts k;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp for schedule(static)
        for (int c = 0; c < count; c++)
            sq(&parts[c], grads, c * chunk, chunk_end(c, chunk, n));
        #pragma omp single
        {
            norm = sqrt(total_of(parts, count));
            k = constants(lr, beta1, beta2, eps, weight_decay, decay, ndecay, t, max_norm, norm);
        }
        if (isfinite(norm)) {
            #pragma omp for schedule(static)
            for (int c = 0; c < count; c++)
                update_span(f, params, m, v, grads, c * chunk, chunk_end(c, chunk, n), &k);
        }
    }
    return norm;
}

/* ---- the update overlapped with other work ---------------------------------------------- */

#define STEP_CHUNK 4096 /* elements of one piece of an overlapped update: ~2 us on one core */

struct rg_update {
    float *params, *m, *v;
    const float *grads;
    size_t n;
    int count; /* pieces of STEP_CHUNK elements (the last may be shorter) */
    adam_consts k;
    update_fn f;
    int next;            /* the next piece to take, for every thread (atomic) */
    int ready;           /* pieces [0, ready) are known done, by the thread doing the work */
    unsigned char *done; /* done[c]: piece c is updated (atomic, release / acquire) */
};

/* Take the next piece and update it; 0 when every piece is taken. */
static int take(rg_update *u) {
    int c = __atomic_fetch_add(&u->next, 1, __ATOMIC_RELAXED);
    if (c >= u->count) return 0;
    update_span(u->f, u->params, u->m, u->v, u->grads, (size_t)c * STEP_CHUNK,
                chunk_end(c, STEP_CHUNK, u->n), &u->k);
    __atomic_store_n(&u->done[c], 1, __ATOMIC_RELEASE);
    return 1;
}

int rg_update_busy(rg_update *u) {
    return __atomic_load_n(&u->next, __ATOMIC_RELAXED) < u->count;
}

void rg_update_wait(rg_update *u, size_t end) {
    int need = (int)((end + STEP_CHUNK - 1) / STEP_CHUNK);
    if (need > u->count) need = u->count;
    while (u->ready < need) {
        if (__atomic_load_n(&u->done[u->ready], __ATOMIC_ACQUIRE))
            u->ready++;
        else if (!take(u))
            rg_relax(); /* another thread is finishing that piece */
    }
}

void rg_adam_apply(float *params, float *m, float *v, const float *grads, size_t n,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   const size_t *decay, size_t ndecay, int t, double max_norm, double norm,
                   void (*work)(void *, rg_update *), void *ctx) {
    int count = (int)((n + STEP_CHUNK - 1) / STEP_CHUNK);
    rg_update u = {params, m, v, grads, n, count,
                   constants(lr, beta1, beta2, eps, weight_decay, decay, ndecay, t, max_norm,
                             norm),
                   update_pick(), 0, count, NULL};
    int nt = rg_num_threads();
    if (work != NULL && nt > 1) u.done = calloc((size_t)count, 1);
    if (u.done == NULL) { /* nothing to overlap (or no memory for it): update, then work */
        nt = n >= PAR_MIN ? nt : 1;
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int c = 0; c < count; c++)
            update_span(u.f, params, m, v, grads, (size_t)c * STEP_CHUNK,
                        chunk_end(c, STEP_CHUNK, n), &u.k);
        if (work != NULL) work(ctx, &u); /* ready = count: its waits return at once */
        return;
    }
    u.ready = 0;
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        if (omp_get_thread_num() == 0) {
            int before = rg_set_local_threads(1);
            work(ctx, &u);
            rg_set_local_threads(before);
        }
#endif
        while (take(&u)) {
        }
    }
    free(u.done);
}
