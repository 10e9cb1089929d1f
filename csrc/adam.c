/* adam.c: the fused Adam / AdamW update over the model's one flat parameter buffer,
 * vectorized in three SIMD variants, threads over contiguous chunks. */
#include "simd.h"

/* Elements [i0, i1). c1, c2: bias corrections 1 / (1 - beta^t); decay = lr * weight_decay. */
RG_INLINE void update(int wide, float *restrict params, float *restrict m, float *restrict v,
                      const float *restrict grads, size_t i0, size_t i1, float b1, float b2,
                      float a1, float a2, float c1, float c2, float lr, float eps, float decay,
                      float grad_scale) {
    (void)wide;
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
                     const float *restrict grads, size_t i0, size_t i1, float b1, float b2,
                     float a1, float a2, float c1, float c2, float lr, float eps, float decay,
                     float grad_scale),
            (params, m, v, grads, i0, i1, b1, b2, a1, a2, c1, c2, lr, eps, decay, grad_scale))

void rg_adam_update(float *params, float *m, float *v, const float *grads, size_t n,
                    double lr, double beta1, double beta2, double eps,
                    double weight_decay, int t, float grad_scale) {
    /* constants in double, then rounded once: 1 - beta2 in float32 would be 1.3e-5 off */
    const float a1 = (float)(1.0 - beta1), a2 = (float)(1.0 - beta2);
    const float c1 = (float)(1.0 / (1.0 - pow(beta1, t)));  /* bias corrections */
    const float c2 = (float)(1.0 / (1.0 - pow(beta2, t)));
    void (*f)(float *restrict, float *restrict, float *restrict, const float *restrict, size_t,
              size_t, float, float, float, float, float, float, float, float, float, float) =
        update_pick();
    int nt = n >= 65536 ? rg_num_threads() : 1;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < nt; c++)
        f(params, m, v, grads, n * c / nt / 16 * 16, c + 1 == nt ? n : n * (c + 1) / nt / 16 * 16,
          (float)beta1, (float)beta2, a1, a2, c1, c2, (float)lr, (float)eps,
          (float)(lr * weight_decay), grad_scale);
}
