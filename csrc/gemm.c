/* gemm.c: single-precision matrix multiply with the transposes forward and backward need. */
#include <string.h>
#include "rustgpt_kernels.h"

void rg_sgemm(float *C, const float *A, const float *B, int M, int N, int K,
              int trans_a, int trans_b, int accumulate) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < M; i++) {
        float *c_i = C + (size_t)i * N;
        if (!accumulate) memset(c_i, 0, (size_t)N * sizeof(float));
        for (int p = 0; p < K; p++) {
            float a = trans_a ? A[(size_t)p * M + i] : A[(size_t)i * K + p];
            if (trans_b) {
                for (int j = 0; j < N; j++) c_i[j] += a * B[(size_t)j * K + p];
            } else {
                const float *b_p = B + (size_t)p * N;
                for (int j = 0; j < N; j++) c_i[j] += a * b_p[j];
            }
        }
    }
}
