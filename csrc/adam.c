/* adam.c: the fused Adam / AdamW update over the model's one flat parameter buffer. */
#include <math.h>
#include "rustgpt_kernels.h"

void rg_adam_update(float *restrict params, float *restrict m, float *restrict v,
                    const float *restrict grads, size_t n,
                    double lr, double beta1, double beta2, double eps,
                    double weight_decay, int t, float grad_scale) {
    /* constants in double, then rounded once: 1 - beta2 in float32 would be 1.3e-5 off */
    const float b1 = (float)beta1, b2 = (float)beta2;
    const float a1 = (float)(1.0 - beta1), a2 = (float)(1.0 - beta2);
    const float c1 = (float)(1.0 / (1.0 - pow(beta1, t)));  /* bias corrections */
    const float c2 = (float)(1.0 / (1.0 - pow(beta2, t)));
    const float lr_f = (float)lr, eps_f = (float)eps, decay = (float)(lr * weight_decay);
    #pragma omp parallel for if (n >= 65536) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float g = grads[i] * grad_scale;
        float m_i = b1 * m[i] + a1 * g;
        float v_i = b2 * v[i] + a2 * g * g;
        m[i] = m_i;
        v[i] = v_i;
        params[i] -= lr_f * (m_i * c1) / (sqrtf(v_i * c2) + eps_f) + decay * params[i];
    }
}
