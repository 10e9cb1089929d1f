/* crossentropy.c: softmax cross-entropy over the vocabulary, fused with its gradient.
 * One row per task; the row loops are vectorized (rg_expf) in three SIMD variants. */
#include "simd.h"

/* Rows [i0, i1): losses, hits (1 where the target's logit is the row's largest, ties
 * included), and when dlogits is not NULL the gradient dlogits = (softmax - onehot(y)) *
 * dscale, zero rows for ignored targets. logits and dlogits may be the same array: each
 * element is read before it is written. */
RG_INLINE void rows(int wide, float *losses, float *dlogits, int *hits, const float *logits,
                    const int *targets, int i0, int i1, int V, int ignore_index,
                    float dscale) {
    (void)wide;
    for (int i = i0; i < i1; i++) {
        const float *x = logits + (size_t)i * V;
        float *dx = dlogits ? dlogits + (size_t)i * V : NULL;
        int y = targets[i];
        if (y == ignore_index) {
            losses[i] = 0.0f;
            hits[i] = 0;
            if (dx) memset(dx, 0, (size_t)V * sizeof(float));
            continue;
        }
        float mx = x[0], sum = 0.0f, xy = x[y];
        #pragma omp simd reduction(max : mx)
        for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        if (dx) { /* keep each e^(x - max) in dx (x may be dx: x[y] is read already) */
            #pragma omp simd reduction(+ : sum)
            for (int j = 0; j < V; j++) {
                float e = rg_expf(x[j] - mx);
                dx[j] = e;
                sum += e;
            }
        } else {
            #pragma omp simd reduction(+ : sum)
            for (int j = 0; j < V; j++) sum += rg_expf(x[j] - mx);
        }
        float lse = mx + logf(sum);
        losses[i] = lse - xy; /* -log softmax(x)[y] */
        hits[i] = xy >= mx && sum == sum; /* y is the argmax; a row with a NaN has none */
        if (!dx) continue;
        /* loss = lse - x[y], so dx = softmax(x) - onehot(y), times dscale */
        float s = dscale / sum;
        #pragma omp simd
        for (int j = 0; j < V; j++) dx[j] *= s;
        dx[y] -= dscale;
    }
}
RG_VARIANTS(rows, (float *losses, float *dlogits, int *hits, const float *logits,
                   const int *targets, int i0, int i1, int V, int ignore_index, float dscale),
            (losses, dlogits, hits, logits, targets, i0, i1, V, ignore_index, dscale))

static void run(float *losses, float *dlogits, int *hits, const float *logits,
                const int *targets, int N, int V, int ignore_index, float dscale) {
    void (*f)(float *, float *, int *, const float *, const int *, int, int, int, int, float) =
        rows_pick();
    int nt = (size_t)N * V >= 65536 ? rg_num_threads() : 1;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < nt; c++)
        f(losses, dlogits, hits, logits, targets, (int)((long)N * c / nt),
          (int)((long)N * (c + 1) / nt), V, ignore_index, dscale);
}

void rg_crossentropy_forward(float *losses, int *hits, const float *logits,
                             const int *targets, int N, int V, int ignore_index) {
    run(losses, NULL, hits, logits, targets, N, V, ignore_index, 0.0f);
}

void rg_crossentropy_forward_backward(float *losses, float *dlogits, int *hits,
                                      const float *logits, const int *targets, int N, int V,
                                      int ignore_index, float dscale) {
    run(losses, dlogits, hits, logits, targets, N, V, ignore_index, dscale);
}
