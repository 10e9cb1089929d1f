/* gemm_bf16.c: matrix multiply on bf16 operands with float32 sums, and its three paths.
 *
 * bf16 is the upper half of a float32 (8 exponent bits, 7 mantissa bits), stored as a
 * uint16_t. The product of two bf16 numbers is exact in float32, so every path computes
 * C (+)= sum_k bf16(op(A)[i, k]) * bf16(op(B)[k, j]) with float32 additions; they differ
 * only in the order of those additions (and AVX512-BF16 / AMX flush subnormals to zero).
 *
 *   for jc in steps of NC (columns of C)          each thread owns a rectangle of C
 *     for pc in steps of KC (the shared dim)
 *       pack op(B)[pc:pc+KC, jc:jc+NC] into pair panels (below), rounded to bf16
 *       for ic in steps of MC (rows of C)
 *         pack op(A)[ic:ic+MC, pc:pc+KC] into bf16 rows
 *         for each MR x NR tile: the path's micro-kernel
 *
 * The packed layouts, shared by every path (and exposed for tests, rg_bf16_pack_a/_b):
 *   A: row-major bf16, Kp = KC rounded up to 32 per row, zeros past K and past the last
 *      row up to a multiple of MR: an AMX A tile is 16 of these rows, 32 values of k each.
 *   B: panels of NR = 32 columns; in a panel, row q holds the pairs (op(B)[2q, j],
 *      op(B)[2q + 1, j]) for j < 32, even k first, zeros past K and N: the "VNNI" layout
 *      that vdpbf16ps reads (lane j of a vector is column j's pair) and that an AMX B tile
 *      is (16 rows of q, 16 columns' pairs per 64-byte row).
 * Paths: portable C (any CPU; compiled per SIMD level as RG_VARIANTS), AVX512-BF16
 * (vdpbf16ps, 12 x 32 tiles) and AMX (tdpbf16ps, 32 x 32 tiles of four 16 x 16
 * accumulators), chosen by rg_bf16_path(). A path is used only where CPUID (and, for AMX,
 * Linux's permission for the tile state) says it runs.
 * The epilogue (bias, pre, activation) runs after the product with the float32 kernels
 * rg_bias_add, rg_relu_forward and rg_gelu_forward.
 */
#include <stdint.h>
#include <string.h>
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef RG_X86
#include <cpuid.h>
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define KCB 512 /* k per packed block, a multiple of 32 */
#define MCB 96  /* rows per packed A block, a multiple of every MR */
#define NCB 512 /* columns per packed B block, a multiple of NR */
#define NR 32
#define PARALLEL_MIN_FMAS (40 * 40 * 40)

static _Thread_local uint16_t a_pack[MCB * KCB] __attribute__((aligned(64)));
static _Thread_local uint16_t b_pack[KCB * NCB] __attribute__((aligned(64)));

/* ---- conversion ------------------------------------------------------------------------ */

/* x rounded to the nearest bf16, ties to even; a NaN stays a (quiet) NaN, overflow gives
 * infinity. Branch-free, so a loop of it vectorizes. */
RG_INLINE uint16_t rg_bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

RG_INLINE float rg_bf16_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

RG_INLINE void to_bf16(int wide, uint16_t *out, const float *x, size_t n) {
    (void)wide;
    for (size_t i = 0; i < n; i++) out[i] = rg_bf16_round(x[i]);
}
RG_VARIANTS(to_bf16, (uint16_t *out, const float *x, size_t n), (out, x, n))

void rg_to_bf16(uint16_t *out, const float *x, size_t n) {
    void (*run)(uint16_t *, const float *, size_t) = to_bf16_pick();
    size_t chunk = 1 << 16, pieces = (n + chunk - 1) / chunk;
    int nt = rg_num_threads();
    #pragma omp parallel for num_threads(nt) if (pieces > 1) schedule(static)
    for (size_t c = 0; c < pieces; c++) {
        size_t lo = c * chunk, len = n - lo < chunk ? n - lo : chunk;
        run(out + lo, x + lo, len);
    }
}

/* ---- packing ----------------------------------------------------------------------------- */

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* Element idx of an operand given as float32 (f, rounded here) or as bf16 (h). */
RG_INLINE uint16_t operand(const float *f, const uint16_t *h, size_t idx) {
    return h ? h[idx] : rg_bf16_round(f[idx]);
}

/* op(A)[i0:i0+mc, p0:p0+kc] as bf16 rows of kp: dst[i*kp + p]; zeros for kc <= p < kp and
 * for mc <= i < mc rounded up to mr. A is (M, K), or (K, M) when trans_a. */
RG_INLINE void pack_a(int wide, uint16_t *dst, const float *A, int M, int K, int trans_a,
                      int i0, int mc, int p0, int kc, int kp, int mr) {
    (void)wide;
    if (trans_a) { /* op(A)[i, p] = A[p, i]: read along rows of A */
        for (int p = 0; p < kc; p++) {
            const float *a_p = A + (size_t)(p0 + p) * M + i0;
            for (int i = 0; i < mc; i++) dst[(size_t)i * kp + p] = rg_bf16_round(a_p[i]);
        }
        for (int i = 0; i < mc; i++)
            memset(dst + (size_t)i * kp + kc, 0, (size_t)(kp - kc) * sizeof(uint16_t));
    } else {
        for (int i = 0; i < mc; i++) {
            const float *a_i = A + (size_t)(i0 + i) * K + p0;
            uint16_t *d_i = dst + (size_t)i * kp;
            for (int p = 0; p < kc; p++) d_i[p] = rg_bf16_round(a_i[p]);
            memset(d_i + kc, 0, (size_t)(kp - kc) * sizeof(uint16_t));
        }
    }
    memset(dst + (size_t)mc * kp, 0, (size_t)(round_up(mc, mr) - mc) * kp * sizeof(uint16_t));
}
RG_VARIANTS(pack_a, (uint16_t *dst, const float *A, int M, int K, int trans_a, int i0, int mc,
                     int p0, int kc, int kp, int mr),
            (dst, A, M, K, trans_a, i0, mc, p0, kc, kp, mr))

/* op(B)[p0:p0+kc, j0:j0+nc] in pair panels of NR columns:
 * dst[(j/NR)*kp*NR + (p/2)*2*NR + 2*(j%NR) + p%2]; zeros for kc <= p < kp and for nc <= j
 * < nc rounded up to NR. B (float32) or Bh (bf16) is (K, N), or (N, K) when trans_b. */
RG_INLINE void pack_b(int wide, uint16_t *dst, const float *B, const uint16_t *Bh, int N,
                      int K, int trans_b, int j0, int nc, int p0, int kc, int kp) {
    (void)wide;
    int panels = (nc + NR - 1) / NR;
    memset(dst, 0, (size_t)panels * kp * NR * sizeof(uint16_t));
    for (int j = 0; j < nc; j++) {
        uint16_t *d = dst + (size_t)(j / NR) * kp * NR + 2 * (j % NR);
        if (trans_b) { /* op(B)[p, j] = B[j, p]: column j is a row of B */
            size_t row = (size_t)(j0 + j) * K + p0;
            for (int p = 0; p < kc; p++)
                d[(size_t)(p / 2) * 2 * NR + (p & 1)] = operand(B, Bh, row + p);
        } else {
            size_t col = (size_t)p0 * N + j0 + j;
            for (int p = 0; p < kc; p++)
                d[(size_t)(p / 2) * 2 * NR + (p & 1)] = operand(B, Bh, col + (size_t)p * N);
        }
    }
}
RG_VARIANTS(pack_b, (uint16_t *dst, const float *B, const uint16_t *Bh, int N, int K,
                     int trans_b, int j0, int nc, int p0, int kc, int kp),
            (dst, B, Bh, N, K, trans_b, j0, nc, p0, kc, kp))

void rg_bf16_pack_a(uint16_t *dst, const float *A, int M, int K, int trans_a, int mr) {
    pack_a_pick()(dst, A, M, K, trans_a, 0, M, 0, K, round_up(K, 32), mr);
}

void rg_bf16_pack_b(uint16_t *dst, const float *B, const uint16_t *Bh, int N, int K,
                    int trans_b) {
    pack_b_pick()(dst, B, Bh, N, K, trans_b, 0, N, 0, K, round_up(K, 32));
}

/* ---- micro-kernels: c (rows x cols, row stride ldc) (+)= ap (mr, kp) @ bp (kp, NR) ----- */

/* One micro-kernel: ap is an A panel (mr rows of kp), bp a B panel, both packed as above;
 * c gets the product added when load_c, else written. Only rows < rows and columns < cols
 * of c are read or written. */
typedef void (*bf16_kernel_fn)(int kp, const uint16_t *ap, const uint16_t *bp, float *c,
                               ptrdiff_t ldc, int load_c, int rows, int cols);

/* Portable C, 4 x 32: each step of q adds the odd product of a pair, then the even one, as
 * vdpbf16ps does (the products are exact, so only the order of the sums matters). */
#define PORT_MR 4
RG_INLINE void kernel_portable(int wide, int kp, const uint16_t *ap, const uint16_t *bp,
                               float *c, ptrdiff_t ldc, int load_c, int rows, int cols) {
    (void)wide;
    float acc[PORT_MR][NR];
    for (int i = 0; i < PORT_MR; i++)
        for (int j = 0; j < NR; j++)
            acc[i][j] = load_c && i < rows && j < cols ? c[i * ldc + j] : 0.0f;
    for (int q = 0; q < kp / 2; q++, bp += 2 * NR) {
        float b0[NR], b1[NR];
        for (int j = 0; j < NR; j++) {
            b0[j] = rg_bf16_float(bp[2 * j]);
            b1[j] = rg_bf16_float(bp[2 * j + 1]);
        }
        for (int i = 0; i < PORT_MR; i++) {
            float a0 = rg_bf16_float(ap[(size_t)i * kp + 2 * q]);
            float a1 = rg_bf16_float(ap[(size_t)i * kp + 2 * q + 1]);
            for (int j = 0; j < NR; j++) {
                acc[i][j] += a1 * b1[j];
                acc[i][j] += a0 * b0[j];
            }
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) c[i * ldc + j] = acc[i][j];
}
RG_VARIANTS(kernel_portable, (int kp, const uint16_t *ap, const uint16_t *bp, float *c,
                              ptrdiff_t ldc, int load_c, int rows, int cols),
            (kp, ap, bp, c, ldc, load_c, rows, cols))

#ifdef RG_X86
/* AVX512-BF16, 12 x 32: 24 zmm accumulators; per pair of k, two vectors of B's pairs and
 * each row's pair of A broadcast to every lane: acc += vdpbf16ps(a pair, B pairs). The
 * panel's rows past `rows` are zeros (packing), computed and not stored. */
#define AVX512BF16_MR 12
#ifndef AVX512BF16_TARGET /* tests/bf16_emulated.c defines it empty, its instructions C */
#define AVX512BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
#endif
AVX512BF16_TARGET
static void kernel_avx512bf16(int kp, const uint16_t *ap, const uint16_t *bp, float *c,
                              ptrdiff_t ldc, int load_c, int rows, int cols) {
    __mmask16 m[2];
    m[0] = (__mmask16)(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
    m[1] = (__mmask16)(cols >= 32 ? 0xFFFFu : cols > 16 ? (1u << (cols - 16)) - 1u : 0u);
    __m512 acc[AVX512BF16_MR][2];
    #pragma GCC unroll 12
    for (int i = 0; i < AVX512BF16_MR; i++)
        for (int h = 0; h < 2; h++)
            acc[i][h] = load_c && i < rows ? _mm512_maskz_loadu_ps(m[h], c + i * ldc + 16 * h)
                                           : _mm512_setzero_ps();
    for (int q = 0; q < kp / 2; q++, bp += 2 * NR) {
        __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + NR);
        #pragma GCC unroll 12
        for (int i = 0; i < AVX512BF16_MR; i++) {
            int pair;
            memcpy(&pair, ap + (size_t)i * kp + 2 * q, sizeof pair);
            __m512i a = _mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)a, (__m512bh)b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)a, (__m512bh)b1);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int h = 0; h < 2; h++) _mm512_mask_storeu_ps(c + i * ldc + 16 * h, m[h], acc[i][h]);
}

/* AMX, 32 x 32: C in tiles 0-3 (16 x 16 float32 each: rows 0-15 / 16-31 x columns 0-15 /
 * 16-31), A in tiles 4, 5 (16 rows x 32 values of k), B in tiles 6, 7 (16 pairs of k x 16
 * columns); per 32 values of k, two A and two B tile loads feed four tdpbf16ps. C goes
 * through a 32 x 32 buffer, so edge tiles need no special case. */
#define AMX_MR 32
#ifndef AMX_TARGET /* as AVX512BF16_TARGET */
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#endif

/* GCC's tile loads (and ldtilecfg, past its first 8 bytes) are asm that does not say it
 * reads memory: this barrier makes the stores to `p` (and all others before it) happen
 * before the tile instructions after it. */
#define AMX_STORES_DONE(p) __asm__ volatile("" : : "r"(p) : "memory")

/* The tile configuration above (palette 1): tiles 0-7 of 16 rows x 64 bytes. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

AMX_TARGET static void amx_begin(void) {
    amx_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    AMX_STORES_DONE(&cfg);
    _tile_loadconfig(&cfg);
}

AMX_TARGET static void amx_end(void) { _tile_release(); }

AMX_TARGET
static void kernel_amx(int kp, const uint16_t *ap, const uint16_t *bp, float *c,
                       ptrdiff_t ldc, int load_c, int rows, int cols) {
    float buf[AMX_MR * NR] __attribute__((aligned(64)));
    const size_t stride = NR * sizeof(float); /* bytes per row of buf */
    AMX_STORES_DONE(ap); /* the packed panels, written before this call */
    if (load_c) {
        memset(buf, 0, sizeof buf);
        for (int i = 0; i < rows; i++)
            memcpy(buf + i * NR, c + i * ldc, (size_t)cols * sizeof(float));
        AMX_STORES_DONE(buf);
        _tile_loadd(0, buf, stride);
        _tile_loadd(1, buf + 16, stride);
        _tile_loadd(2, buf + 16 * NR, stride);
        _tile_loadd(3, buf + 16 * NR + 16, stride);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int k = 0; k < kp; k += 32) {
        _tile_loadd(4, ap + k, (size_t)kp * sizeof(uint16_t));
        _tile_loadd(5, ap + (size_t)16 * kp + k, (size_t)kp * sizeof(uint16_t));
        const uint16_t *b = bp + (size_t)(k / 2) * 2 * NR; /* pair row k/2 */
        _tile_loadd(6, b, 2 * NR * sizeof(uint16_t));
        _tile_loadd(7, b + NR, 2 * NR * sizeof(uint16_t)); /* columns 16-31 */
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, buf, stride);
    _tile_stored(1, buf + 16, stride);
    _tile_stored(2, buf + 16 * NR, stride);
    _tile_stored(3, buf + 16 * NR + 16, stride);
    for (int i = 0; i < rows; i++)
        memcpy(c + i * ldc, buf + i * NR, (size_t)cols * sizeof(float));
}
#endif

/* ---- a few rows: the weights' bf16 copy read where it is -------------------------------- */

/* Decoding multiplies a few rows of activations by a weight matrix whose bf16 copy (Bh)
 * exists already: packing it on every call would cost about as much as the multiply-adds
 * it feeds, so for M <= SMALL_M rows the kernels below read Bh in place (half the bytes of
 * float32 weights), widen each bf16 to a float32 in registers and multiply-add in float32,
 * over row groups of SM_ROWS rows and blocks of SM_KB values of k (A's block rounded to
 * bf16 first, into sm_a). Every CPU runs them (8- or 16-lane vectors); the sums are those
 * of the other paths in another order. */
#define SMALL_M 16
#define SM_ROWS 4
#define SM_KB 512
#define SM_AHEAD 16 /* rows of B ahead that sm_nn prefetches: its walk down B's columns
                       leaves a 4 KiB page every few rows, where the prefetchers stop */
static _Thread_local float sm_a[SM_ROWS * SM_KB] __attribute__((aligned(64)));

typedef float f32x8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float f32x16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* rows x kb of op(A) from (i0, p0), rounded to bf16 and widened again, into a[i * kb + p]. */
RG_INLINE void sm_round_a(float *a, const float *A, int M, int K, int trans_a, int i0,
                          int rows, int p0, int kb) {
    for (int i = 0; i < rows; i++)
        for (int p = 0; p < kb; p++) {
            size_t idx = trans_a ? (size_t)(p0 + p) * M + i0 + i : (size_t)(i0 + i) * K + p0 + p;
            a[i * kb + p] = rg_bf16_float(rg_bf16_round(A[idx]));
        }
}

/* Two vectors of lanes columns (VF: float vectors, VU: bf16, VW: uint32): for B (K, N) not
 * transposed, C[i0:i0+rows, j0:j0+2*lanes] (+)= a (rows x kb) @ Bh[p0:p0+kb, j0:...]. */
#define SM_COLUMNS(VF, VU, VW, lanes)                                                     \
    do {                                                                                  \
        VF acc[SM_ROWS][2];                                                               \
        for (int i = 0; i < SM_ROWS; i++)                                                 \
            for (int h = 0; h < 2; h++)                                                   \
                acc[i][h] = load_c && i < rows ? *(const VF *)(c + (size_t)i * ldc + h * lanes) \
                                               : (VF){0};                                 \
        const uint16_t *b = Bh + (size_t)p0 * N + j0;                                     \
        for (int p = 0; p < kb; p++, b += N) {                                            \
            __builtin_prefetch(b + SM_AHEAD * N);                                         \
            VF w[2];                                                                      \
            for (int h = 0; h < 2; h++) {                                                 \
                VW u = __builtin_convertvector(*(const VU *)(b + h * lanes), VW) << 16;   \
                memcpy(&w[h], &u, sizeof u);                                              \
            }                                                                             \
            for (int i = 0; i < SM_ROWS; i++)                                             \
                for (int h = 0; h < 2; h++) acc[i][h] += a[i * kb + p] * w[h];            \
        }                                                                                 \
        for (int i = 0; i < rows; i++)                                                    \
            for (int h = 0; h < 2; h++) *(VF *)(c + (size_t)i * ldc + h * lanes) = acc[i][h]; \
    } while (0)

/* For B (K, N) not transposed: C[i0:i0+rows, n0:n1] (+)= a @ op(B)[p0:p0+kb, n0:n1], a
 * holding rows x kb of bf16(op(A)) (rows <= SM_ROWS; rows past `rows` of a are read, not
 * stored). Columns in steps of two vectors, then one at a time. */
RG_INLINE void sm_nn(int wide, float *C, const float *a, const uint16_t *Bh, int N, int i0,
                     int rows, int p0, int kb, int load_c, int n0, int n1) {
    ptrdiff_t ldc = N;
    int j0 = n0;
    if (wide == 1)
        for (; j0 + 32 <= n1; j0 += 32) {
            float *c = C + (size_t)i0 * N + j0;
            SM_COLUMNS(f32x16, u16x16, u32x16, 16);
        }
    for (; j0 + 16 <= n1; j0 += 16) {
        float *c = C + (size_t)i0 * N + j0;
        SM_COLUMNS(f32x8, u16x8, u32x8, 8);
    }
    for (int j = j0; j < n1; j++)
        for (int i = 0; i < rows; i++) {
            float s = load_c ? C[(size_t)(i0 + i) * N + j] : 0.0f;
            for (int p = 0; p < kb; p++)
                s += a[i * kb + p] * rg_bf16_float(Bh[(size_t)(p0 + p) * N + j]);
            C[(size_t)(i0 + i) * N + j] = s;
        }
}

/* For B transposed (Bh (N, K): column j of op(B) is row j of Bh): C[i0:i0+rows, n0:n1] (+)=
 * a @ op(B)[p0:p0+kb, n0:n1], each column a dot product over k in 8 lanes per row. */
RG_INLINE void sm_nt(int wide, float *C, const float *a, const uint16_t *Bh, int N, int K,
                     int i0, int rows, int p0, int kb, int load_c, int n0, int n1) {
    (void)wide;
    int kv = kb / 8 * 8;
    for (int j = n0; j < n1; j++) {
        const uint16_t *b = Bh + (size_t)j * K + p0;
        f32x8 acc[SM_ROWS] = {{0}};
        for (int p = 0; p < kv; p += 8) {
            u32x8 u = __builtin_convertvector(*(const u16x8 *)(b + p), u32x8) << 16;
            f32x8 w;
            memcpy(&w, &u, sizeof u);
            for (int i = 0; i < SM_ROWS; i++) acc[i] += *(const f32x8 *)(a + i * kb + p) * w;
        }
        for (int i = 0; i < rows; i++) {
            float s = 0.0f;
            for (int l = 0; l < 8; l++) s += acc[i][l];
            for (int p = kv; p < kb; p++) s += a[i * kb + p] * rg_bf16_float(b[p]);
            float *c = C + (size_t)(i0 + i) * N + j;
            *c = load_c ? *c + s : s;
        }
    }
}

/* C[:, n0:n1] (+)= bf16(op(A)) @ op(B)[:, n0:n1] for M <= SMALL_M, from Bh, on this
 * thread. */
RG_INLINE void small_m(int wide, float *C, const float *A, const uint16_t *Bh, int M, int N,
                       int K, int trans_a, int trans_b, int accumulate, int n0, int n1) {
    for (int i0 = 0; i0 < M; i0 += SM_ROWS) {
        int rows = M - i0 < SM_ROWS ? M - i0 : SM_ROWS;
        for (int p0 = 0; p0 < K; p0 += SM_KB) {
            int kb = K - p0 < SM_KB ? K - p0 : SM_KB;
            sm_round_a(sm_a, A, M, K, trans_a, i0, rows, p0, kb);
            /* rows past `rows` are read by the vector loops: zeros */
            memset(sm_a + (size_t)rows * kb, 0, (size_t)(SM_ROWS - rows) * kb * sizeof(float));
            int load_c = accumulate || p0 > 0;
            if (trans_b)
                sm_nt(wide, C, sm_a, Bh, N, K, i0, rows, p0, kb, load_c, n0, n1);
            else
                sm_nn(wide, C, sm_a, Bh, N, i0, rows, p0, kb, load_c, n0, n1);
        }
    }
}
RG_VARIANTS(small_m, (float *C, const float *A, const uint16_t *Bh, int M, int N, int K,
                      int trans_a, int trans_b, int accumulate, int n0, int n1),
            (C, A, Bh, M, N, K, trans_a, trans_b, accumulate, n0, n1))

/* ---- which path ---------------------------------------------------------------------------- */

static int cpu_avx512bf16(void) {
#ifdef RG_X86
    unsigned a, b, c, d;
    return rg_simd_supported() == RG_SIMD_AVX512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)
           && (a >> 5 & 1u);
#else
    return 0;
#endif
}

/* AMX-TILE and AMX-BF16 in CPUID, the tile state enabled by the OS (XCR0 bits 17, 18), and
 * Linux's permission for this process to use it, asked for once: 1 when granted, 0 when the
 * CPU lacks AMX, -1 when the OS refused. */
static int amx_state = -2; /* -2: not asked yet */

static int amx_available(void) {
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state != -2) return state;
    state = 0;
#if defined(RG_X86) && defined(__linux__)
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1u) && (d >> 24 & 1u)) {
        unsigned lo = 0, hi = 0;
        __get_cpuid(1, &a, &b, &c, &d);
        if (c >> 27 & 1u) /* OSXSAVE: xgetbv may run */
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo >> 17 & 3u) == 3u) {
            /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA: the tile data may be used */
            state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
        }
    }
#endif
    __atomic_store_n(&amx_state, state, __ATOMIC_RELEASE);
    return state;
}

int rg_bf16_supported(void) {
    return 1 << RG_BF16_PORTABLE | cpu_avx512bf16() << RG_BF16_AVX512
           | (amx_available() == 1) << RG_BF16_AMX;
}

static int bf16_path = -1; /* -1: not chosen yet */

int rg_bf16_path(void) {
    int path = __atomic_load_n(&bf16_path, __ATOMIC_RELAXED);
    if (path < 0) {
        int have = rg_bf16_supported();
        path = have >> RG_BF16_AMX & 1 ? RG_BF16_AMX
             : have >> RG_BF16_AVX512 & 1 ? RG_BF16_AVX512 : RG_BF16_PORTABLE;
        __atomic_store_n(&bf16_path, path, __ATOMIC_RELAXED);
    }
    return path;
}

int rg_set_bf16_path(int path) {
    if (path < RG_BF16_PORTABLE || path > RG_BF16_AMX) return -1;
    if (path == RG_BF16_AMX && amx_available() < 0) return -2;
    if (!(rg_bf16_supported() >> path & 1)) return -1;
    __atomic_store_n(&bf16_path, path, __ATOMIC_RELAXED);
    return 0;
}

typedef struct {
    int mr;
    bf16_kernel_fn kernel;
    int amx; /* tiles configured per thread around the work */
} bf16_path_t;

static bf16_path_t choose_path(void) {
    bf16_path_t p = {PORT_MR, kernel_portable_pick(), 0};
#ifdef RG_X86
    int path = rg_bf16_path();
    if (path == RG_BF16_AMX) {
        p.mr = AMX_MR; p.kernel = kernel_amx; p.amx = 1;
    } else if (path == RG_BF16_AVX512) {
        p.mr = AVX512BF16_MR; p.kernel = kernel_avx512bf16;
    }
#endif
    return p;
}

/* ---- driver ---------------------------------------------------------------------------------- */

/* C[m0:m1, n0:n1] (+)= op(A) @ op(B) over those rows and columns, on this thread. */
static void gemm_bf16_block(const bf16_path_t *path, float *C, const float *A, const float *B,
                            const uint16_t *Bh, int M, int N, int K, int trans_a, int trans_b,
                            int accumulate, int m0, int m1, int n0, int n1) {
    void (*pa)(uint16_t *, const float *, int, int, int, int, int, int, int, int, int) =
        pack_a_pick();
    void (*pb)(uint16_t *, const float *, const uint16_t *, int, int, int, int, int, int, int,
               int) = pack_b_pick();
    int mr = path->mr;
    for (int jc = n0; jc < n1; jc += NCB) {
        int nc = n1 - jc < NCB ? n1 - jc : NCB;
        for (int pc = 0; pc < K; pc += KCB) {
            int kc = K - pc < KCB ? K - pc : KCB, kp = round_up(kc, 32);
            pb(b_pack, B, Bh, N, K, trans_b, jc, nc, pc, kc, kp);
            for (int ic = m0; ic < m1; ic += MCB) {
                int mc = m1 - ic < MCB ? m1 - ic : MCB;
                pa(a_pack, A, M, K, trans_a, ic, mc, pc, kc, kp, mr);
                for (int jr = 0; jr < nc; jr += NR)
                    for (int ir = 0; ir < mc; ir += mr)
                        path->kernel(kp, a_pack + (size_t)ir * kp, b_pack + (size_t)jr * kp,
                                     C + (size_t)(ic + ir) * N + jc + jr, N,
                                     accumulate || pc > 0, mc - ir < mr ? mc - ir : mr,
                                     nc - jr < NR ? nc - jr : NR);
            }
        }
    }
}

/* The packed paths over all of C, threads splitting it into rectangles. */
static void gemm_packed(float *C, const float *A, const float *B, const uint16_t *Bh, int M,
                        int N, int K, int trans_a, int trans_b, int accumulate, int nthreads) {
    bf16_path_t path = choose_path();
    /* tm x tn rectangles of whole tiles, one per thread: the split whose busiest thread
     * has the fewest multiply-adds plus packing (a split along M packs B again per thread,
     * one along N packs A again) */
    int mt = (M + path.mr - 1) / path.mr, nt = (N + NR - 1) / NR, tm = 1, tn = 1;
    double best = -1.0;
    for (int t = 1; t <= nthreads && t <= mt; t++)
        for (int u = 1; t * u <= nthreads && u <= nt; u++) {
            double rows = (double)((mt + t - 1) / t) * path.mr;
            double cols = (double)((nt + u - 1) / u) * NR;
            double cost = rows * cols * K / 32.0 + (rows + cols) * K;
            if (best < 0 || cost < best) { best = cost; tm = t; tn = u; }
        }
    nthreads = tm * tn;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#ifdef _OPENMP
        int first = omp_get_thread_num(), step = omp_get_num_threads();
#else
        int first = 0, step = 1;
#endif
#ifdef RG_X86
        if (path.amx) amx_begin();
#endif
        for (int t = first; t < nthreads; t += step) {
            int ti = t / tn, tj = t % tn;
            int m0 = (int)((long)mt * ti / tm) * path.mr, m1 = (int)((long)mt * (ti + 1) / tm) * path.mr;
            int n0 = (int)((long)nt * tj / tn) * NR, n1 = (int)((long)nt * (tj + 1) / tn) * NR;
            if (m1 > M) m1 = M;
            if (n1 > N) n1 = N;
            if (m0 < m1 && n0 < n1)
                gemm_bf16_block(&path, C, A, B, Bh, M, N, K, trans_a, trans_b, accumulate,
                                m0, m1, n0, n1);
        }
#ifdef RG_X86
        if (path.amx) amx_end();
#endif
    }
}

/* small_m over all of C, threads splitting the columns in steps of 32. */
static void gemm_small_m(float *C, const float *A, const uint16_t *Bh, int M, int N, int K,
                         int trans_a, int trans_b, int accumulate, int nthreads) {
    void (*run)(float *, const float *, const uint16_t *, int, int, int, int, int, int, int,
                int) = small_m_pick();
    int nt = (N + 31) / 32;
    if (nthreads > nt) nthreads = nt;
    #pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(static)
    for (int t = 0; t < nthreads; t++) {
        int n0 = (int)((long)nt * t / nthreads) * 32, n1 = (int)((long)nt * (t + 1) / nthreads) * 32;
        if (n1 > N) n1 = N;
        if (n0 < n1) run(C, A, Bh, M, N, K, trans_a, trans_b, accumulate, n0, n1);
    }
}

void rg_gemm_bf16(float *C, const float *A, const float *B, const uint16_t *Bh, int M, int N,
                  int K, int trans_a, int trans_b, int accumulate, const float *bias, int act,
                  float *pre) {
    int nthreads = rg_num_threads();
    if ((double)M * N * K < PARALLEL_MIN_FMAS) nthreads = 1;
    if (Bh && M <= SMALL_M)
        gemm_small_m(C, A, Bh, M, N, K, trans_a, trans_b, accumulate, nthreads);
    else
        gemm_packed(C, A, B, Bh, M, N, K, trans_a, trans_b, accumulate, nthreads);
    if (bias) rg_bias_add(C, bias, M, N);
    if (pre) memcpy(pre, C, (size_t)M * N * sizeof(float));
    if (act == RG_ACT_RELU) rg_relu_forward(C, C, (size_t)M * N);
    if (act == RG_ACT_GELU) rg_gelu_forward(C, C, (size_t)M * N);
}
