/* attention.c: causal multi-head softmax attention, forward, backward and one KV-cache step. */
#include <math.h>
#include "rustgpt_kernels.h"

void rg_attention_forward(float *out, float *att, const float *q, const float *k,
                          const float *v, int B, int T, int D, int NH) {
    int hs = D / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float *q_t = q + ((size_t)b * T + t) * D + h * hs;
                float *att_t = att + (((size_t)b * NH + h) * T + t) * T;
                float mx = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k_t2 = k + ((size_t)b * T + t2) * D + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) s += q_t[i] * k_t2[i];
                    s *= scale;
                    att_t[t2] = s;
                    mx = s > mx ? s : mx;
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    att_t[t2] = expf(att_t[t2] - mx);
                    sum += att_t[t2];
                }
                for (int t2 = 0; t2 <= t; t2++) att_t[t2] /= sum;
                for (int t2 = t + 1; t2 < T; t2++) att_t[t2] = 0.0f;
                float *out_t = out + ((size_t)b * T + t) * D + h * hs;
                for (int i = 0; i < hs; i++) out_t[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v_t2 = v + ((size_t)b * T + t2) * D + h * hs;
                    for (int i = 0; i < hs; i++) out_t[i] += att_t[t2] * v_t2[i];
                }
            }
        }
    }
}

void rg_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                           const float *att, const float *q, const float *k, const float *v,
                           int B, int T, int D, int NH) {
    int hs = D / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                size_t row = ((size_t)b * T + t) * D + h * hs;
                for (int i = 0; i < hs; i++) dq[row + i] = dk[row + i] = dv[row + i] = 0.0f;
            }
            for (int t = 0; t < T; t++) {
                const float *att_t = att + (((size_t)b * NH + h) * T + t) * T;
                const float *dout_t = dout + ((size_t)b * T + t) * D + h * hs;
                const float *q_t = q + ((size_t)b * T + t) * D + h * hs;
                float *dq_t = dq + ((size_t)b * T + t) * D + h * hs;
                /* datt[t2] = dout_t . v_t2;  dpre = att * (datt - sum(att * datt)) */
                float dot = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v_t2 = v + ((size_t)b * T + t2) * D + h * hs;
                    float datt = 0.0f;
                    for (int i = 0; i < hs; i++) datt += dout_t[i] * v_t2[i];
                    dot += att_t[t2] * datt;
                }
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v_t2 = v + ((size_t)b * T + t2) * D + h * hs;
                    const float *k_t2 = k + ((size_t)b * T + t2) * D + h * hs;
                    float *dk_t2 = dk + ((size_t)b * T + t2) * D + h * hs;
                    float *dv_t2 = dv + ((size_t)b * T + t2) * D + h * hs;
                    float datt = 0.0f;
                    for (int i = 0; i < hs; i++) datt += dout_t[i] * v_t2[i];
                    float dpre = att_t[t2] * (datt - dot) * scale;
                    for (int i = 0; i < hs; i++) {
                        dq_t[i] += dpre * k_t2[i];
                        dk_t2[i] += dpre * q_t[i];
                        dv_t2[i] += att_t[t2] * dout_t[i];
                    }
                }
            }
        }
    }
}

void rg_attention_step(float *out, const float *q, const float *kcache, const float *vcache,
                       int B, int n, int Tmax, int D, int NH) {
    int hs = D / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q_b = q + (size_t)b * D + h * hs;
            float *out_b = out + (size_t)b * D + h * hs;
            float mx = -INFINITY;
            for (int t2 = 0; t2 < n; t2++) {
                const float *k_t2 = kcache + ((size_t)b * Tmax + t2) * D + h * hs;
                float s = 0.0f;
                for (int i = 0; i < hs; i++) s += q_b[i] * k_t2[i];
                s *= scale;
                mx = s > mx ? s : mx;
            }
            float sum = 0.0f;
            for (int i = 0; i < hs; i++) out_b[i] = 0.0f;
            for (int t2 = 0; t2 < n; t2++) {
                const float *k_t2 = kcache + ((size_t)b * Tmax + t2) * D + h * hs;
                const float *v_t2 = vcache + ((size_t)b * Tmax + t2) * D + h * hs;
                float s = 0.0f;
                for (int i = 0; i < hs; i++) s += q_b[i] * k_t2[i];
                float p = expf(s * scale - mx);
                sum += p;
                for (int i = 0; i < hs; i++) out_b[i] += p * v_t2[i];
            }
            for (int i = 0; i < hs; i++) out_b[i] /= sum;
        }
    }
}
