/* csrc/gemm_bf16.c's AVX512-BF16 and AMX paths, and the 16-lane variant of its few-rows
 * path, run on a CPU without those instructions: each instruction they use is emulated in
 * C below (following Intel's pseudocode for it), the kernels are compiled without their
 * target attributes, and rg_gemm_bf16 runs on each path for shapes that cover every edge
 * (tile, panel and block edges of M, N and K; both transposes; accumulate; B rounded while
 * packed or read from its bf16 copy; 1 and 2 threads), against float64 sums of the
 * bf16-rounded operands. The emulated tile unit also checks that the kernels configure the
 * tiles before use and that every tile operation fits the configured shapes.
 *
 * tests/test_bf16.py builds this with csrc/runtime.c and csrc/elementwise.c and runs it;
 * it prints the largest error per path and "ok", or what failed (exit 1). Where the CPU
 * has the instructions, tests/test_bf16.py runs the real ones as well. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float emu_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static void emu_fail(const char *what) {
    fprintf(stderr, "emulated instruction misused: %s\n", what);
    exit(1);
}

/* ---- AVX-512 (BF16): vectors as arrays of lanes ----------------------------------------- */

static __m512i emu_loadu_si512(const void *p) {
    __m512i v;
    memcpy(&v, p, sizeof v);
    return v;
}

static __m512i emu_set1_epi32(int x) {
    int32_t lanes[16];
    for (int i = 0; i < 16; i++) lanes[i] = x;
    return emu_loadu_si512(lanes);
}

static __m512 emu_setzero_ps(void) {
    __m512 v;
    memset(&v, 0, sizeof v);
    return v;
}

/* lanes whose mask bit is clear are neither read nor written */
static __m512 emu_maskz_loadu_ps(__mmask16 m, const float *p) {
    float lanes[16];
    for (int i = 0; i < 16; i++) lanes[i] = m >> i & 1 ? p[i] : 0.0f;
    __m512 v;
    memcpy(&v, lanes, sizeof v);
    return v;
}

static void emu_mask_storeu_ps(float *p, __mmask16 m, __m512 v) {
    float lanes[16];
    memcpy(lanes, &v, sizeof lanes);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) p[i] = lanes[i];
}

static long emu_vdpbf16ps, emu_tdpbf16ps; /* instructions run, both paths' threads */

/* vdpbf16ps: lane i += a.bf16[2i+1] * b.bf16[2i+1], then += a.bf16[2i] * b.bf16[2i] */
static __m512 emu_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
    __atomic_add_fetch(&emu_vdpbf16ps, 1, __ATOMIC_RELAXED);
    float s[16];
    uint16_t x[32], y[32];
    memcpy(s, &acc, sizeof s);
    memcpy(x, &a, sizeof x);
    memcpy(y, &b, sizeof y);
    for (int i = 0; i < 16; i++) {
        s[i] += emu_float(x[2 * i + 1]) * emu_float(y[2 * i + 1]);
        s[i] += emu_float(x[2 * i]) * emu_float(y[2 * i]);
    }
    memcpy(&acc, s, sizeof acc);
    return acc;
}

#define _mm512_loadu_si512 emu_loadu_si512
#define _mm512_set1_epi32 emu_set1_epi32
#define _mm512_setzero_ps emu_setzero_ps
#define _mm512_maskz_loadu_ps emu_maskz_loadu_ps
#define _mm512_mask_storeu_ps emu_mask_storeu_ps
#define _mm512_dpbf16_ps emu_dpbf16_ps

/* ---- AMX: eight tiles of up to 16 rows x 64 bytes, per thread ----------------------------- */

static _Thread_local struct {
    int configured;
    uint8_t rows[8];
    uint16_t colsb[8];
    uint8_t data[8][16][64];
} emu_amx;

/* ldtilecfg: a 64-byte block: palette (byte 0), colsb[16] (bytes 16-47), rows[16] (48-63) */
static void emu_tile_loadconfig(const void *config) {
    const uint8_t *c = config;
    if (c[0] != 1) emu_fail("ldtilecfg: palette is not 1");
    for (int t = 0; t < 8; t++) {
        memcpy(&emu_amx.colsb[t], c + 16 + 2 * t, 2);
        emu_amx.rows[t] = c[48 + t];
        if (emu_amx.rows[t] > 16 || emu_amx.colsb[t] > 64)
            emu_fail("ldtilecfg: a tile larger than 16 rows x 64 bytes");
    }
    emu_amx.configured = 1;
}

static void emu_tile_release(void) { memset(&emu_amx, 0, sizeof emu_amx); }

static void emu_tile_check(int t) {
    if (!emu_amx.configured) emu_fail("a tile instruction before ldtilecfg");
    if (t < 0 || t > 7 || emu_amx.rows[t] == 0) emu_fail("an unconfigured tile");
}

static void emu_tile_loadd(int t, const void *base, size_t stride) {
    emu_tile_check(t);
    for (int r = 0; r < emu_amx.rows[t]; r++)
        memcpy(emu_amx.data[t][r], (const uint8_t *)base + r * stride, emu_amx.colsb[t]);
}

static void emu_tile_stored(int t, void *base, size_t stride) {
    emu_tile_check(t);
    for (int r = 0; r < emu_amx.rows[t]; r++)
        memcpy((uint8_t *)base + r * stride, emu_amx.data[t][r], emu_amx.colsb[t]);
}

static void emu_tile_zero(int t) {
    emu_tile_check(t);
    memset(emu_amx.data[t], 0, sizeof emu_amx.data[t]);
}

/* tdpbf16ps: C[m][n] += A[m].bf16[2k] * B[k].bf16[2n] + A[m].bf16[2k+1] * B[k].bf16[2n+1] */
static void emu_tile_dpbf16ps(int c, int a, int b) {
    __atomic_add_fetch(&emu_tdpbf16ps, 1, __ATOMIC_RELAXED);
    emu_tile_check(c);
    emu_tile_check(a);
    emu_tile_check(b);
    int M = emu_amx.rows[c], N = emu_amx.colsb[c] / 4, Kq = emu_amx.colsb[a] / 4;
    if (emu_amx.rows[a] != M || emu_amx.rows[b] != Kq || emu_amx.colsb[b] != emu_amx.colsb[c])
        emu_fail("tdpbf16ps: tile shapes that do not multiply");
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s;
            memcpy(&s, emu_amx.data[c][m] + 4 * n, 4);
            for (int k = 0; k < Kq; k++) {
                uint16_t x[2], y[2];
                memcpy(x, emu_amx.data[a][m] + 4 * k, 4);
                memcpy(y, emu_amx.data[b][k] + 4 * n, 4);
                s += emu_float(x[0]) * emu_float(y[0]);
                s += emu_float(x[1]) * emu_float(y[1]);
            }
            memcpy(emu_amx.data[c][m] + 4 * n, &s, 4);
        }
}

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig emu_tile_loadconfig
#define _tile_release emu_tile_release
#define _tile_loadd emu_tile_loadd
#define _tile_stored emu_tile_stored
#define _tile_zero emu_tile_zero
#define _tile_dpbf16ps emu_tile_dpbf16ps

/* the kernels compiled for this CPU, their instructions the functions above */
#define AVX512BF16_TARGET
#define AMX_TARGET
#include "gemm_bf16.c"

/* ---- the checks --------------------------------------------------------------------------- */

#include "native.h"

/* C (M x N) against float64 sums of the bf16-rounded op(A) @ op(B) (+ C0); the error
 * relative to the sums of |products|, which bounds float32 rounding: returned, and a
 * failure printed past tol. */
static double check(const char *what, const float *C, const float *C0, const float *A,
                    const float *B, int M, int N, int K, int ta, int tb, double tol) {
    double worst = 0.0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = C0 ? C0[(size_t)i * N + j] : 0.0, mag = fabs(s) + 1e-30;
            for (int p = 0; p < K; p++) {
                float a = ta ? A[(size_t)p * M + i] : A[(size_t)i * K + p];
                float b = tb ? B[(size_t)j * K + p] : B[(size_t)p * N + j];
                double prod = (double)emu_float(rg_bf16_round(a)) * emu_float(rg_bf16_round(b));
                s += prod;
                mag += fabs(prod);
            }
            double err = fabs(C[(size_t)i * N + j] - s) / mag;
            if (!(err <= tol)) {
                printf("FAIL %s: C[%d, %d] = %.9g, expected %.9g\n", what, i, j,
                       C[(size_t)i * N + j], s);
                exit(1);
            }
            if (err > worst) worst = err;
        }
    return worst;
}

static double one_case(int path, int M, int N, int K, int ta, int tb, int accumulate,
                       int copy) {
    float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
    float *C = malloc(sizeof(float) * M * N), *C0 = malloc(sizeof(float) * M * N);
    uint16_t *Bh = copy ? malloc(sizeof(uint16_t) * K * N) : NULL;
    for (int i = 0; i < M * K; i++) A[i] = uniform();
    for (int i = 0; i < K * N; i++) B[i] = uniform();
    for (int i = 0; i < M * N; i++) C0[i] = C[i] = accumulate ? uniform() : NAN;
    if (Bh) rg_to_bf16(Bh, B, (size_t)K * N);
    rg_gemm_bf16(C, A, B, Bh, M, N, K, ta, tb, accumulate, NULL, 0, NULL);
    char what[160];
    snprintf(what, sizeof what, "path %d, M %d N %d K %d, trans %d%d, accumulate %d, copy %d",
             path, M, N, K, ta, tb, accumulate, copy);
    double err = check(what, C, accumulate ? C0 : NULL, A, B, M, N, K, ta, tb, 2e-6);
    free(A), free(B), free(C), free(C0), free(Bh);
    return err;
}

/* The 16-lane few-rows path (AVX-512 CPUs take it) for M <= SMALL_M rows from the copy. */
static double wide_case(int M, int N, int K, int ta, int tb, int accumulate) {
    float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
    float *C = malloc(sizeof(float) * M * N), *C0 = malloc(sizeof(float) * M * N);
    uint16_t *Bh = malloc(sizeof(uint16_t) * K * N);
    for (int i = 0; i < M * K; i++) A[i] = uniform();
    for (int i = 0; i < K * N; i++) B[i] = uniform();
    for (int i = 0; i < M * N; i++) C0[i] = C[i] = accumulate ? uniform() : NAN;
    rg_to_bf16(Bh, B, (size_t)K * N);
    small_m(1, C, A, Bh, M, N, K, ta, tb, accumulate, 0, N);
    char what[160];
    snprintf(what, sizeof what, "16-lane few rows, M %d N %d K %d, trans %d%d, accumulate %d",
             M, N, K, ta, tb, accumulate);
    double err = check(what, C, accumulate ? C0 : NULL, A, B, M, N, K, ta, tb, 2e-6);
    free(A), free(B), free(C), free(C0), free(Bh);
    return err;
}

int main(void) {
    /* M: AVX512-BF16 tiles of 12 rows and AMX tiles of 32, the few-rows bound 16, past a
     * block of 96 rows; N: panels of 32, past a block of 512; K: pairs, 32-value steps,
     * past a block of 512 */
    static const int shapes[][3] = {
        {17, 1, 1}, {17, 5, 3}, {24, 32, 32}, {25, 33, 33}, {32, 64, 64}, {33, 31, 70},
        {45, 100, 129}, {100, 40, 600}, {97, 530, 35}};
    const char *names[] = {"portable", "avx512bf16", "amx"};
    for (int path = RG_BF16_PORTABLE; path <= RG_BF16_AMX; path++) {
        __atomic_store_n(&bf16_path, path, __ATOMIC_RELAXED); /* past the CPU's check */
        double worst = 0.0;
        for (int threads = 1; threads <= 2; threads++) {
            rg_set_num_threads(threads);
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
                for (int t = 0; t < 4; t++)
                    for (int acc = 0; acc <= 1; acc++)
                        for (int copy = 0; copy <= 1; copy++) {
                            double e = one_case(path, shapes[s][0], shapes[s][1],
                                                shapes[s][2], t >> 1, t & 1, acc, copy);
                            if (e > worst) worst = e;
                        }
        }
        printf("%s: largest relative error %.3g\n", names[path], worst);
        long ran = path == RG_BF16_AVX512 ? emu_vdpbf16ps : path == RG_BF16_AMX ? emu_tdpbf16ps
                                                                                 : 1;
        if (ran == 0) {
            printf("FAIL %s: its instruction never ran\n", names[path]);
            return 1;
        }
    }
    static const int few[][3] = {{1, 1, 1}, {3, 45, 7}, {4, 100, 128}, {5, 33, 600},
                                 {16, 130, 530}, {16, 64, 513}};
    double worst = 0.0;
    for (size_t s = 0; s < sizeof few / sizeof few[0]; s++)
        for (int t = 0; t < 4; t++)
            for (int acc = 0; acc <= 1; acc++) {
                double e = wide_case(few[s][0], few[s][1], few[s][2], t >> 1, t & 1, acc);
                if (e > worst) worst = e;
            }
    printf("16-lane few rows: largest relative error %.3g\n", worst);
    printf("vdpbf16ps %ld, tdpbf16ps %ld emulated\nok\n", emu_vdpbf16ps, emu_tdpbf16ps);
    return 0;
}
