/* crossentropy.c: softmax cross-entropy over the vocabulary, fused with its gradient. */
#include <math.h>
#include "rustgpt_kernels.h"

/* Row i's log-sum-exp, max-shifted for stability. logits_i: (V). */
static float logsumexp(const float *logits_i, int V, float *maxv) {
    float mx = logits_i[0];
    for (int j = 1; j < V; j++) mx = logits_i[j] > mx ? logits_i[j] : mx;
    float sum = 0.0f;
    for (int j = 0; j < V; j++) sum += expf(logits_i[j] - mx);
    *maxv = mx;
    return mx + logf(sum);
}

void rg_crossentropy_forward(float *losses, const float *logits, const int *targets,
                             int N, int V, int ignore_index) {
    #pragma omp parallel for if ((size_t)N * V >= 32768) schedule(static)
    for (int i = 0; i < N; i++) {
        const float *logits_i = logits + (size_t)i * V;
        float mx;
        losses[i] = targets[i] == ignore_index
                        ? 0.0f
                        : logsumexp(logits_i, V, &mx) - logits_i[targets[i]];
    }
}

void rg_crossentropy_forward_backward(float *losses, float *dlogits, const float *logits,
                                      const int *targets, int N, int V, int ignore_index,
                                      float dscale) {
    #pragma omp parallel for if ((size_t)N * V >= 32768) schedule(static)
    for (int i = 0; i < N; i++) {
        const float *logits_i = logits + (size_t)i * V;
        float *dlogits_i = dlogits + (size_t)i * V;
        int y = targets[i];
        if (y == ignore_index) {
            losses[i] = 0.0f;
            for (int j = 0; j < V; j++) dlogits_i[j] = 0.0f;
            continue;
        }
        float mx;
        float lse = logsumexp(logits_i, V, &mx);
        losses[i] = lse - logits_i[y];
        /* loss = lse - logits[y], so dlogits = softmax - onehot(y); read before write */
        for (int j = 0; j < V; j++) dlogits_i[j] = expf(logits_i[j] - lse) * dscale;
        dlogits_i[y] -= dscale;
    }
}
