/* csrc/attention.c's AVX-512 variants, whose bodies take explicit 16-lane paths (wide = 1:
 * the score and mix blocks, the decoding step's dot products), run on a CPU without
 * AVX-512: RG_AVX512 is defined empty, so those variants are compiled for this CPU (their
 * 16-lane vectors split by the compiler) and picked by a SIMD level set to AVX-512 here.
 * Forward, backward and the decoding step at that level are checked against the generic
 * variant (float loops, which tests/test_kernels_attention.py checks against float64 on
 * every CPU) over head sizes below, at and past 16 lanes, rows of every block edge, and
 * 1 and 2 threads.
 *
 * tests/test_kernels_attention.py builds and runs this; it prints the largest difference
 * and "ok", or what differed (exit 1). */
#define RG_AVX512
#include "attention.c"

#include <stdio.h>
#include <stdlib.h>

static int level = RG_SIMD_GENERIC, threads = 1;

int rg_simd_level(void) { return level; }
int rg_num_threads(void) { return threads; }

#include "native.h"

static float *random_array(size_t n) {
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = uniform();
    return x;
}

static double worst = 0.0;

/* x (at AVX-512) against y (generic): |x - y| <= 1e-5 (1 + |y|) */
static void same(const char *what, const float *x, const float *y, size_t n, int B, int T,
                 int D, int NH) {
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)x[i] - y[i]);
        if (!(d <= 1e-5 * (1.0 + fabs(y[i])))) {
            printf("FAIL %s (B %d, T %d, D %d, NH %d, %d threads): [%zu] = %.9g at AVX-512, "
                   "%.9g generic\n", what, B, T, D, NH, threads, i, x[i], y[i]);
            exit(1);
        }
        if (d > worst) worst = d;
    }
}

static void one_case(int B, int T, int D, int NH) {
    size_t n = (size_t)B * T * D, na = (size_t)B * NH * T * T;
    size_t area = rg_attention_scratch_size(T, D, NH);
    float *q = random_array(n), *k = random_array(n), *v = random_array(n);
    float *dout = random_array(n), *scratch = malloc(2 * area * sizeof(float));
    float *out[2], *att[2], *dq[2], *dk[2], *dv[2], *ds[2], *step[2];
    int *len = malloc(B * sizeof(int));
    for (int b = 0; b < B; b++) len[b] = 1 + (b * 7 + T / 2) % T; /* rows at their own n */
    float *step_scratch = malloc((size_t)B * NH * T * sizeof(float));
    for (int run = 0; run < 2; run++) { /* 0: AVX-512's variants, 1: generic */
        level = run == 0 ? RG_SIMD_AVX512 : RG_SIMD_GENERIC;
        out[run] = malloc(n * sizeof(float)), att[run] = malloc(na * sizeof(float));
        dq[run] = malloc(n * sizeof(float)), dk[run] = malloc(n * sizeof(float));
        dv[run] = malloc(n * sizeof(float)), ds[run] = calloc(na, sizeof(float));
        step[run] = malloc((size_t)B * D * sizeof(float));
        rg_attention_forward(out[run], att[run], scratch, q, k, v, B, T, D, NH, 2);
        rg_attention_backward(dq[run], dk[run], dv[run], ds[run], scratch, dout, att[run], q,
                              k, v, B, T, D, NH, 2);
        /* the step's query: row b's position len[b] - 1; the cache: k and v as (B, T, D) */
        rg_attention_step(step[run], step_scratch, q, k, v, len, B, T, D, NH);
    }
    same("forward out", out[0], out[1], n, B, T, D, NH);
    same("forward att", att[0], att[1], na, B, T, D, NH);
    same("backward dq", dq[0], dq[1], n, B, T, D, NH);
    same("backward dk", dk[0], dk[1], n, B, T, D, NH);
    same("backward dv", dv[0], dv[1], n, B, T, D, NH);
    same("step out", step[0], step[1], (size_t)B * D, B, T, D, NH);
    for (int run = 0; run < 2; run++)
        free(out[run]), free(att[run]), free(dq[run]), free(dk[run]), free(dv[run]),
            free(ds[run]), free(step[run]);
    free(q), free(k), free(v), free(dout), free(scratch), free(len), free(step_scratch);
}

int main(void) {
    /* head sizes 8 (below 16 lanes), 16, 32, 48, 128; T across blocks of 4 rows, 16 keys */
    static const int shapes[][4] = {{1, 1, 16, 1},  {2, 5, 64, 2},  {1, 17, 16, 1},
                                    {2, 33, 64, 4}, {1, 64, 32, 4}, {3, 37, 96, 2},
                                    {2, 50, 128, 1}, {1, 70, 48, 1}};
    for (threads = 1; threads <= 2; threads++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            one_case(shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
    printf("largest difference %.3g\nok\n", worst);
    return 0;
}
