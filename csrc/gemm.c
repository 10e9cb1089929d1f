/* gemm.c: single-precision matrix multiply with the transposes forward and backward need.
 *
 * GotoBLAS / BLIS structure. Each thread owns a rectangle of C and runs, on it:
 *
 *   for jc in steps of NC (columns of C)         B block (KC, NC) packed, lives in L2
 *     for pc in steps of KC (the shared dim)
 *       pack op(B)[pc:pc+KC, jc:jc+NC] into NR-wide panels
 *       for ic in steps of MC (rows of C)
 *         pack op(A)[ic:ic+MC, pc:pc+KC] into MR-tall panels
 *         for ir in steps of MR                  A micro-panel (MR, KC) stays in L1
 *           for jr in steps of NR                B micro-panels stream from L2
 *             micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= Ap (MR, KC) @ Bp (KC, NR)
 *
 * Packing reads op(A) and op(B) through the transposes, so one micro-kernel serves all
 * four (trans_a, trans_b) combinations. The micro-kernel always computes whole MR x NR
 * tiles: B panels are padded with zeros past N, A panels past M hold whatever was there
 * (rows of C past M are never stored), and tiles on the right edge of C go through a small
 * buffer on the stack. It keeps the tile of C in registers; there is one per SIMD path
 * (AVX-512, AVX2+FMA, portable C), chosen by rg_simd_level() at each call. A transposed
 * with few columns (M <= A_INPLACE_MAX_M: the weight gradients) is read in place, not
 * packed: each k's MR values of a panel are contiguous in A's row already. With few row
 * panels (M <= SMALL_M) and B not transposed, B is read in place instead (gemm_small_m);
 * with those and B transposed (dx = dy W^T), AVX-512 takes dot products of rows of A and B
 * as they lie (gemm_dot). Pack buffers are static per thread (_Thread_local); nothing is allocated on the heap.
 * rg_sgemm's epilogue (bias, relu or GELU, the values before the activation) runs on C as
 * its parts are finished, while they are in cache (gemm_epilogue).
 */
#include <stddef.h>
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Cache blocking, shared by every path: MR x KC of A (at most 24 KiB) stays in the 32 KiB L1
 * while the B micro-panels stream past it from the KC x NC (1 MiB) block in L2 / L3; a large
 * KC touches C fewer times. MC and NC are multiples of every MR / NR; K is cut into equal
 * blocks of at most KC. */
#ifndef KC /* -D overrides are for tuning runs */
#define KC 512
#endif
#ifndef MC
#define MC 96
#endif
#ifndef NC
#define NC 512
#endif
#define MR_MAX 12
#define NR_MAX 32

static _Thread_local float a_pack[MC * KC] __attribute__((aligned(64)));
static _Thread_local float b_pack[KC * NC] __attribute__((aligned(64)));

/* One micro-kernel: c (rows, NR) with row stride ldc gets ap (kc, MR) @ bp (kc, NR), added
 * onto c when load_c, else written over it. ap is k-major with row stride lda (MR when
 * packed, M when read straight from a transposed A; the generic kernel, which reads all MR
 * values of each k, takes only packed A); bp has row stride ldb (NR when packed, N when
 * read straight from B). rows <= MR, and the rows of c past `rows` are neither read nor
 * written. cols <= NR is a hint: the columns past it are not needed (on the
 * right edge c is a whole-width buffer), so a kernel may skip vectors that lie wholly past it.
 * Before storing, it adds bias (NR floats, the tile's columns' biases; NULL for none) to each
 * row and, when relu, takes max(x, 0): rg_sgemm's epilogue on the tile's last block of k. */
typedef void (*microkernel_fn)(int kc, const float *ap, ptrdiff_t lda, const float *bp,
                               ptrdiff_t ldb, float *c, ptrdiff_t ldc, int load_c, int rows,
                               int cols, const float *bias, int relu);

typedef struct {
    int mr, nr;
    microkernel_fn kernel;
} gemm_path;

/* ---- micro-kernels ------------------------------------------------------------------------- */

/* Portable C, 4 x 8, on GCC / Clang 4-float vectors (SSE on x86-64, NEON on arm64):
 * 8 accumulators, 2 for the B row, 1 for the broadcast A value. */
#define GEN_MR 4
#define GEN_NR 8
typedef float v4f __attribute__((vector_size(16)));
typedef int v4i __attribute__((vector_size(16)));
static void kernel_generic(int kc, const float *ap, ptrdiff_t lda, const float *bp,
                           ptrdiff_t ldb, float *c, ptrdiff_t ldc, int load_c, int rows,
                           int cols, const float *bias, int relu) {
    (void)cols;
    v4f acc[GEN_MR][2];
    for (int i = 0; i < GEN_MR; i++)
        for (int h = 0; h < 2; h++) {
            v4f x = {0.0f, 0.0f, 0.0f, 0.0f};
            if (load_c && i < rows) memcpy(&x, c + i * ldc + 4 * h, sizeof x);
            acc[i][h] = x;
        }
    for (int p = 0; p < kc; p++) {
        v4f b0, b1;
        memcpy(&b0, bp, sizeof b0);
        memcpy(&b1, bp + 4, sizeof b1);
        for (int i = 0; i < GEN_MR; i++) {
            v4f a = {ap[i], ap[i], ap[i], ap[i]};
            acc[i][0] += a * b0;
            acc[i][1] += a * b1;
        }
        ap += lda;
        bp += ldb;
    }
    for (int h = 0; h < 2 && bias; h++) {
        v4f b;
        memcpy(&b, bias + 4 * h, sizeof b);
        for (int i = 0; i < GEN_MR; i++) acc[i][h] += b;
    }
    for (int i = 0; i < GEN_MR && relu; i++) /* x > 0 ? x : 0, as a mask */
        for (int h = 0; h < 2; h++) acc[i][h] = (v4f)((v4i)acc[i][h] & (acc[i][h] > 0.0f));
    for (int i = 0; i < rows; i++)
        for (int h = 0; h < 2; h++) memcpy(c + i * ldc + 4 * h, &acc[i][h], sizeof acc[i][h]);
}

#ifdef RG_X86
/* One case of a micro-kernel's switch over its rows: BODY inlined for MU rows, with two
 * vectors of columns when more than VEC columns are needed, else one. */
#define KERNEL_CASE(BODY, MU, VEC) \
    case MU: \
        if (cols > VEC) BODY(kc, ap, lda, bp, ldb, c, ldc, load_c, MU, MU, 2, bias, relu); \
        else            BODY(kc, ap, lda, bp, ldb, c, ldc, load_c, MU, MU, 1, bias, relu); \
        break;

/* A SIMD micro-kernel's epilogue on its accumulators acc[MU][NU], vectors of W floats:
 * the columns' biases added, then relu (max(x, 0) gives 0 for NaN too, as x > 0 ? x : 0). */
#define KERNEL_EPILOGUE(W, LOADU, ADD, MAX, ZERO) \
    if (bias) { \
        _Pragma("GCC unroll 2") for (int h = 0; h < NU; h++) \
            _Pragma("GCC unroll 12") for (int i = 0; i < MU; i++) \
                acc[i][h] = ADD(acc[i][h], LOADU(bias + (W) * h)); \
    } \
    if (relu) { \
        _Pragma("GCC unroll 12") for (int i = 0; i < MU; i++) \
            _Pragma("GCC unroll 2") for (int h = 0; h < NU; h++) \
                acc[i][h] = MAX(acc[i][h], ZERO()); \
    }

/* AVX2 + FMA, 6 x 16: 12 ymm accumulators, 2 for the B row, 1 for the broadcast A value.
 * The body is written once for MU <= 6 used rows and NU <= 2 vectors of columns and inlined
 * for every MU and NU = 2, 1, so short or narrow edge tiles (a batch-1 training step has
 * M = T rows, a decoding step M = batch rows) do no multiply-adds for rows or vectors of
 * columns they do not store. */
#define AVX2_MR 6
#define AVX2_NR 16
#define AVX2_TARGET __attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) AVX2_TARGET
void kernel_avx2_body(int kc, const float *ap, ptrdiff_t lda, const float *bp, ptrdiff_t ldb,
                      float *c, ptrdiff_t ldc, int load_c, int rows, const int MU,
                      const int NU, const float *bias, int relu) {
    __m256 acc[AVX2_MR][2];
    #pragma GCC unroll 6
    for (int i = 0; i < MU; i++) {
        int ld = load_c && i < rows;
        #pragma GCC unroll 2
        for (int h = 0; h < NU; h++)
            acc[i][h] = ld ? _mm256_loadu_ps(c + i * ldc + 8 * h) : _mm256_setzero_ps();
    }
    for (int p = 0; p < kc; p++) {
        __m256 b[2];
        #pragma GCC unroll 2
        for (int h = 0; h < NU; h++) b[h] = _mm256_loadu_ps(bp + 8 * h);
        #pragma GCC unroll 6
        for (int i = 0; i < MU; i++) {
            __m256 a = _mm256_broadcast_ss(ap + i);
            #pragma GCC unroll 2
            for (int h = 0; h < NU; h++) acc[i][h] = _mm256_fmadd_ps(a, b[h], acc[i][h]);
        }
        ap += lda;
        bp += ldb;
    }
    KERNEL_EPILOGUE(8, _mm256_loadu_ps, _mm256_add_ps, _mm256_max_ps, _mm256_setzero_ps);
    #pragma GCC unroll 6
    for (int i = 0; i < MU; i++) {
        if (i >= rows) break;
        #pragma GCC unroll 2
        for (int h = 0; h < NU; h++) _mm256_storeu_ps(c + i * ldc + 8 * h, acc[i][h]);
    }
}

AVX2_TARGET
static void kernel_avx2(int kc, const float *ap, ptrdiff_t lda, const float *bp,
                        ptrdiff_t ldb, float *c, ptrdiff_t ldc, int load_c, int rows, int cols,
                        const float *bias, int relu) {
    switch (rows) {
        KERNEL_CASE(kernel_avx2_body, 6, 8) KERNEL_CASE(kernel_avx2_body, 5, 8)
        KERNEL_CASE(kernel_avx2_body, 4, 8) KERNEL_CASE(kernel_avx2_body, 3, 8)
        KERNEL_CASE(kernel_avx2_body, 2, 8) KERNEL_CASE(kernel_avx2_body, 1, 8)
    }
}

/* AVX-512, 12 x 32: 24 zmm accumulators, the A values broadcast straight from memory.
 * Inlined for every MU <= 12 used rows and NU = 2, 1 vectors of columns, as above. */
#define AVX512_MR 12
#define AVX512_NR 32
#define AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma")))
static inline __attribute__((always_inline)) AVX512_TARGET
void kernel_avx512_body(int kc, const float *ap, ptrdiff_t lda, const float *bp,
                        ptrdiff_t ldb, float *c, ptrdiff_t ldc, int load_c, int rows,
                        const int MU, const int NU, const float *bias, int relu) {
    __m512 acc[AVX512_MR][2];
    #pragma GCC unroll 12
    for (int i = 0; i < MU; i++) {
        int ld = load_c && i < rows;
        #pragma GCC unroll 2
        for (int h = 0; h < NU; h++)
            acc[i][h] = ld ? _mm512_loadu_ps(c + i * ldc + 16 * h) : _mm512_setzero_ps();
    }
    for (int p = 0; p < kc; p++) {
        __m512 b[2];
        #pragma GCC unroll 2
        for (int h = 0; h < NU; h++) b[h] = _mm512_loadu_ps(bp + 16 * h);
        #pragma GCC unroll 12
        for (int i = 0; i < MU; i++) {
            __m512 a = _mm512_set1_ps(ap[i]);
            #pragma GCC unroll 2
            for (int h = 0; h < NU; h++) acc[i][h] = _mm512_fmadd_ps(a, b[h], acc[i][h]);
        }
        ap += lda;
        bp += ldb;
    }
    KERNEL_EPILOGUE(16, _mm512_loadu_ps, _mm512_add_ps, _mm512_max_ps, _mm512_setzero_ps);
    #pragma GCC unroll 12
    for (int i = 0; i < MU; i++) {
        if (i >= rows) break;
        #pragma GCC unroll 2
        for (int h = 0; h < NU; h++) _mm512_storeu_ps(c + i * ldc + 16 * h, acc[i][h]);
    }
}

AVX512_TARGET
static void kernel_avx512(int kc, const float *ap, ptrdiff_t lda, const float *bp,
                          ptrdiff_t ldb, float *c, ptrdiff_t ldc, int load_c, int rows,
                          int cols, const float *bias, int relu) {
    switch (rows) {
        KERNEL_CASE(kernel_avx512_body, 12, 16) KERNEL_CASE(kernel_avx512_body, 11, 16)
        KERNEL_CASE(kernel_avx512_body, 10, 16) KERNEL_CASE(kernel_avx512_body, 9, 16)
        KERNEL_CASE(kernel_avx512_body, 8, 16) KERNEL_CASE(kernel_avx512_body, 7, 16)
        KERNEL_CASE(kernel_avx512_body, 6, 16) KERNEL_CASE(kernel_avx512_body, 5, 16)
        KERNEL_CASE(kernel_avx512_body, 4, 16) KERNEL_CASE(kernel_avx512_body, 3, 16)
        KERNEL_CASE(kernel_avx512_body, 2, 16) KERNEL_CASE(kernel_avx512_body, 1, 16)
    }
}
#undef KERNEL_CASE
#undef KERNEL_EPILOGUE
#endif

static gemm_path choose_path(void) {
    gemm_path path = {GEN_MR, GEN_NR, kernel_generic};
#ifdef RG_X86
    int level = rg_simd_level();
    if (level >= RG_SIMD_AVX512) {
        path.mr = AVX512_MR; path.nr = AVX512_NR; path.kernel = kernel_avx512;
    } else if (level >= RG_SIMD_AVX2) {
        path.mr = AVX2_MR; path.nr = AVX2_NR; path.kernel = kernel_avx2;
    }
#endif
    return path;
}

/* ---- packing ------------------------------------------------------------------------------- */

/* Copy-pack of a whole block into panels of width w:
 * d[(c/w)*kc*w + p*w + c%w] = src[p*ld + c] for p < kc, c < n; zero up to the next multiple
 * of w when pad. Packs op(A) when trans_a (each k a contiguous run of rows) and op(B) when not
 * trans_b. Row by row of src, so the reads stream through memory and the prefetchers keep up
 * (panel by panel would walk down src with a stride of ld). */
static inline void pack_copy(float *d, const float *src, size_t ld, int n, int w, int kc,
                             int pad) {
    int whole = n / w, rest = n - whole * w;
    size_t panel = (size_t)kc * w;
    for (int p = 0; p < kc; p++, src += ld) {
        float *d_p = d + (size_t)p * w;
        /* the width a constant, so each copy is a few vector moves */
#define PACK_COPY_W(W) \
        case W: \
            for (int jp = 0; jp < whole; jp++) \
                memcpy(d_p + jp * panel, src + jp * W, W * sizeof(float)); \
            break;
        switch (w) {
            PACK_COPY_W(32) PACK_COPY_W(16) PACK_COPY_W(12) PACK_COPY_W(8) PACK_COPY_W(6)
            PACK_COPY_W(4)
            default:
                for (int jp = 0; jp < whole; jp++)
                    memcpy(d_p + jp * panel, src + jp * w, (size_t)w * sizeof(float));
        }
#undef PACK_COPY_W
        if (rest) {
            float *e = d_p + whole * panel;
            const float *s_e = src + whole * w;
            for (int c = 0; c < rest; c++) e[c] = s_e[c];
            for (int c = rest; pad && c < w; c++) e[c] = 0.0f;
        }
    }
}

/* op(A)[i0:i0+mc, p0:p0+kc] into panels of mr rows, k-major: dst[(i/mr)*kc*mr + p*mr + i%mr].
 * A is (M, K), or (K, M) when trans_a. Rows past mc are left as they are: a row of C
 * depends only on its row of A, and the micro-kernel never stores those rows. */
static void pack_a(float *dst, const float *A, int M, int K, int trans_a, int i0, int mc,
                   int p0, int kc, int mr) {
    if (trans_a) { /* op(A)[i, p] = A[p, i] */
        pack_copy(dst, A + (size_t)p0 * M + i0, (size_t)M, mc, mr, kc, 0);
        return;
    }
    for (int ip = 0; ip < mc; ip += mr) { /* op(A)[i, p] = A[i, p] */
        int rows = mc - ip < mr ? mc - ip : mr;
        rg_transpose(dst + (size_t)ip * kc, A + (size_t)(i0 + ip) * K + p0, (size_t)K, rows,
                       mr, kc, 0);
    }
}

/* op(B)[p0:p0+kc, j0:j0+nc] into panels of nr columns, k-major:
 * dst[(j/nr)*kc*nr + p*nr + j%nr]. B is (K, N), or (N, K) when trans_b. Columns past nc
 * are zero. */
static void pack_b(float *dst, const float *B, int N, int K, int trans_b, int j0, int nc,
                   int p0, int kc, int nr) {
    if (!trans_b) { /* op(B)[p, j] = B[p, j] */
        pack_copy(dst, B + (size_t)p0 * N + j0, (size_t)N, nc, nr, kc, 1);
        return;
    }
    for (int jp = 0; jp < nc; jp += nr) { /* op(B)[p, j] = B[j, p] */
        int cols = nc - jp < nr ? nc - jp : nr;
        rg_transpose(dst + (size_t)jp * kc, B + (size_t)(j0 + jp) * K + p0, (size_t)K, cols,
                       nr, kc, 1);
    }
}

/* ---- driver ---------------------------------------------------------------------------------- */

/* c (rows x cols, row stride ldc) copied to pre (the same layout) when pre is not NULL, then
 * act (RG_ACT_*) applied to it: the end of rg_sgemm's epilogue, in three SIMD variants
 * (GELU is worth vectorizing). */
RG_INLINE void finish_rows(int wide, float *c, float *pre, size_t ldc, int rows, int cols,
                           int act) {
    (void)wide;
    for (int i = 0; i < rows; i++) {
        float *c_i = c + (size_t)i * ldc;
        if (pre) memcpy(pre + (size_t)i * ldc, c_i, (size_t)cols * sizeof(float));
        if (act == RG_ACT_GELU) {
            #pragma omp simd
            for (int j = 0; j < cols; j++) c_i[j] = rg_gelu(c_i[j]);
        } else if (act == RG_ACT_RELU) {
            for (int j = 0; j < cols; j++) c_i[j] = c_i[j] > 0.0f ? c_i[j] : 0.0f;
        }
    }
}
RG_VARIANTS(finish_rows, (float *c, float *pre, size_t ldc, int rows, int cols, int act),
            (c, pre, ldc, rows, cols, act))

/* What rg_sgemm does to C once its products are done: add a bias per column, keep the
 * values in pre, apply the activation. A relu without pre runs in the micro-kernel on
 * each tile, with the bias; otherwise the micro-kernel adds the bias and the rest ("the
 * finish") runs over a whole row panel of C at a time, while it is in cache (per tile,
 * GELU's vector loops were too short). */
typedef struct {
    const float *bias; /* N floats, or NULL */
    int act;           /* RG_ACT_* */
    float *pre;        /* (M, N), or NULL */
    void (*finish)(float *, float *, size_t, int, int, int); /* finish_rows' variant */
} gemm_epilogue;

/* Whether the micro-kernel applies e's relu in registers (nothing needs the values before
 * it), and whether e has a finish. */
static inline int kernel_relu(const gemm_epilogue *e) {
    return e && e->act == RG_ACT_RELU && !e->pre;
}
static inline int has_finish(const gemm_epilogue *e) {
    return e && (e->pre || e->act == RG_ACT_GELU);
}

/* Rows [i0, i0 + rows), columns [j0, j0 + cols) of C (row stride N), a tile the
 * micro-kernel computed without its epilogue (the right edge): the bias, and the
 * micro-kernel's relu when there is no finish. */
static void edge_epilogue(const gemm_epilogue *e, float *C, size_t N, int i0, int j0,
                          int rows, int cols) {
    float *c = C + (size_t)i0 * N + j0;
    for (int i = 0; i < rows && e->bias; i++) {
        float *c_i = c + (size_t)i * N;
        const float *b = e->bias + j0;
        for (int j = 0; j < cols; j++) c_i[j] += b[j];
    }
    if (kernel_relu(e)) e->finish(c, NULL, N, rows, cols, RG_ACT_RELU);
}

/* The finish of rows [i0, i0 + rows), columns [j0, j0 + cols) of C (row stride N). */
static void finish(const gemm_epilogue *e, float *C, size_t N, int i0, int j0, int rows,
                   int cols) {
    e->finish(C + (size_t)i0 * N + j0, e->pre ? e->pre + (size_t)i0 * N + j0 : NULL, N, rows,
              cols, e->act);
}

/* A transposed, (K, M), is read in place instead of packed when M is at most this (and
 * the kernel reads only the rows it is given): row p of each MR-row panel is MR floats of
 * A's row p, and at a stride of up to 1.5 KiB the panel's kc rows still spread over L1's
 * sets. Packing had cost the weight gradients dW = x^T dy (M = D) 3-15% (128 x 1024 x 128:
 * 180 -> 210 GFLOP/s); at M = 512 and over, the strided panel is slower to reread than
 * packing it (2048 x 2048 x 512: 203 -> 192). */
#ifndef A_INPLACE_MAX_M
#define A_INPLACE_MAX_M 384
#endif

/* C[m0:m1, n0:n1] (+)= op(A)[m0:m1, :] @ op(B)[:, n0:n1] on the calling thread, then epi
 * (NULL: none) on each tile after its last block of k. */
static void gemm_block(gemm_path path, float *C, const float *A, const float *B, int M, int N,
                       int K, int trans_a, int trans_b, int accumulate, int m0, int m1, int n0,
                       int n1, const gemm_epilogue *epi) {
    const int mr = path.mr, nr = path.nr;
    float *ap = a_pack, *bp = b_pack;
    float edge[MR_MAX * NR_MAX] __attribute__((aligned(64)));
    int kblocks = (K + KC - 1) / KC;
    int kstep = ((K + kblocks - 1) / kblocks + 3) & ~3; /* <= KC, a multiple of 4 */
    int inplace = trans_a && M <= A_INPLACE_MAX_M && path.kernel != kernel_generic;
    ptrdiff_t lda = inplace ? M : mr;
    for (int jc = n0; jc < n1; jc += NC) {
        int nc = n1 - jc < NC ? n1 - jc : NC;
        for (int pc = 0; pc < K; pc += kstep) {
            int kc = K - pc < kstep ? K - pc : kstep;
            int load_c = accumulate || pc > 0;
            const gemm_epilogue *last = pc + kc >= K ? epi : NULL;
            pack_b(bp, B, N, K, trans_b, jc, nc, pc, kc, nr);
            for (int ic = m0; ic < m1; ic += MC) {
                int mc = m1 - ic < MC ? m1 - ic : MC;
                if (!inplace) pack_a(ap, A, M, K, trans_a, ic, mc, pc, kc, mr);
                for (int ir = 0; ir < mc; ir += mr) {
                    int rows = mc - ir < mr ? mc - ir : mr;
                    const float *a_panel = inplace ? A + (size_t)pc * M + ic + ir
                                                   : ap + (size_t)ir * kc;
                    for (int jr = 0; jr < nc; jr += nr) {
                        int cols = nc - jr < nr ? nc - jr : nr;
                        const float *b_panel = bp + (size_t)jr * kc;
                        float *c_tile = C + (size_t)(ic + ir) * N + jc + jr;
                        if (cols == nr) {
                            path.kernel(kc, a_panel, lda, b_panel, nr, c_tile, N, load_c,
                                        rows, nr,
                                        last && last->bias ? last->bias + jc + jr : NULL,
                                        kernel_relu(last));
                            continue;
                        }
                        /* right edge: through a whole-width buffer */
                        if (load_c)
                            for (int i = 0; i < rows; i++)
                                memcpy(edge + i * nr, c_tile + (size_t)i * N,
                                       (size_t)cols * sizeof(float));
                        path.kernel(kc, a_panel, lda, b_panel, nr, edge, nr, load_c, rows,
                                    cols, NULL, 0);
                        for (int i = 0; i < rows; i++)
                            memcpy(c_tile + (size_t)i * N, edge + i * nr,
                                   (size_t)cols * sizeof(float));
                        if (last) edge_epilogue(last, C, N, ic + ir, jc + jr, rows, cols);
                    }
                    if (has_finish(last)) finish(last, C, N, ic + ir, jc, rows, nc);
                }
            }
        }
    }
}

/* C[:, n0:n1] (+)= op(A) @ B[:, n0:n1] for a few row panels (M <= SMALL_M) and B not
 * transposed: each B element is used by only those few panels, so packing B would cost
 * about as much as the multiply-adds it feeds; the micro-kernel reads B in place (row
 * stride N), one column panel at a time for every row panel while it is in L1, and only
 * the right edge strip and A (panels of mr x K) are packed. The caller checks that the A
 * panels fit a_pack (MC * KC floats), which also keeps the strip (K x nr) within b_pack.
 * a_packed: a_pack holds this A already (the previous product of rg_sgemm_many had it).
 * epi (NULL: none) goes over each tile as it is finished. */
static void gemm_small_m(gemm_path path, float *C, const float *A, const float *B, int M, int N,
                         int K, int trans_a, int accumulate, int a_packed, int n0, int n1,
                         const gemm_epilogue *epi) {
    const int mr = path.mr, nr = path.nr;
    float edge[MR_MAX * NR_MAX] __attribute__((aligned(64)));
    if (!a_packed) pack_a(a_pack, A, M, K, trans_a, 0, M, 0, K, mr);
    int j = n0;
    for (; j + nr <= n1; j += nr)
        for (int ip = 0; ip < M; ip += mr) {
            int rows = M - ip < mr ? M - ip : mr;
            float *c = C + (size_t)ip * N + j;
            path.kernel(K, a_pack + (size_t)ip * K, mr, B + j, N, c, N, accumulate, rows, nr,
                        epi && epi->bias ? epi->bias + j : NULL, kernel_relu(epi));
        }
    if (j < n1) {
        int cols = n1 - j;
        pack_b(b_pack, B, N, K, 0, j, cols, 0, K, nr);
        for (int ip = 0; ip < M; ip += mr) {
            int rows = M - ip < mr ? M - ip : mr;
            float *c = C + (size_t)ip * N + j;
            if (accumulate)
                for (int i = 0; i < rows; i++)
                    memcpy(edge + i * nr, c + (size_t)i * N, (size_t)cols * sizeof(float));
            path.kernel(K, a_pack + (size_t)ip * K, mr, b_pack, nr, edge, nr, accumulate, rows,
                        cols, NULL, 0);
            for (int i = 0; i < rows; i++)
                memcpy(c + (size_t)i * N, edge + i * nr, (size_t)cols * sizeof(float));
            if (epi) edge_epilogue(epi, C, N, ip, j, rows, cols);
        }
    }
    if (has_finish(epi)) finish(epi, C, N, 0, n0, M, n1 - n0); /* M <= SMALL_M rows */
}

#ifdef RG_X86
/* C[:, n0:n1] (+)= A @ B[n0:n1, :]^T for a few rows of A (not transposed, M <= SMALL_M) and
 * B transposed, (N, K), on AVX-512: each C[i, j] is the dot product of two rows contiguous
 * in k, so nothing is packed (packing B^T cost about as much as the multiply-adds it fed
 * at 17 rows). Blocks of up to 4 rows of A x 4 rows of B keep 16 vectors of partial sums,
 * each summed across its lanes at the end (in a fixed order: a C element does not depend
 * on the blocks or the thread count). B's 4 rows stay in L1 while every row of A passes. */
#define DOT_I 4
#define DOT_J 4
static inline __attribute__((always_inline)) AVX512_TARGET
void dot_body(const float *a, const float *b, int K, float *c, ptrdiff_t ldc, int accumulate,
              const int MI, const int NJ) {
    __m512 acc[DOT_I][DOT_J];
    #pragma GCC unroll 4
    for (int i = 0; i < MI; i++)
        #pragma GCC unroll 4
        for (int j = 0; j < NJ; j++) acc[i][j] = _mm512_setzero_ps();
    int p = 0;
    for (; p + 16 <= K; p += 16) {
        __m512 av[DOT_I], bv[DOT_J];
        #pragma GCC unroll 4
        for (int i = 0; i < MI; i++) av[i] = _mm512_loadu_ps(a + (size_t)i * K + p);
        #pragma GCC unroll 4
        for (int j = 0; j < NJ; j++) bv[j] = _mm512_loadu_ps(b + (size_t)j * K + p);
        #pragma GCC unroll 4
        for (int i = 0; i < MI; i++)
            #pragma GCC unroll 4
            for (int j = 0; j < NJ; j++) acc[i][j] = _mm512_fmadd_ps(av[i], bv[j], acc[i][j]);
    }
    if (p < K) {
        __mmask16 m = (__mmask16)((1u << (K - p)) - 1u);
        __m512 av[DOT_I], bv[DOT_J];
        #pragma GCC unroll 4
        for (int i = 0; i < MI; i++) av[i] = _mm512_maskz_loadu_ps(m, a + (size_t)i * K + p);
        #pragma GCC unroll 4
        for (int j = 0; j < NJ; j++) bv[j] = _mm512_maskz_loadu_ps(m, b + (size_t)j * K + p);
        #pragma GCC unroll 4
        for (int i = 0; i < MI; i++)
            #pragma GCC unroll 4
            for (int j = 0; j < NJ; j++) acc[i][j] = _mm512_fmadd_ps(av[i], bv[j], acc[i][j]);
    }
    /* per row of A, the 4 vectors' lane sums in one 4-float vector (missing rows of B add
     * zeros), in a fixed order: pairs of lanes, then the four 128-bit quarters */
    const __mmask8 store = (__mmask8)((1u << NJ) - 1u);
    #pragma GCC unroll 4
    for (int i = 0; i < MI; i++) {
        #pragma GCC unroll 4
        for (int j = NJ; j < DOT_J; j++) acc[i][j] = _mm512_setzero_ps();
        __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[i][0], acc[i][1]),
                                  _mm512_unpackhi_ps(acc[i][0], acc[i][1]));
        __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[i][2], acc[i][3]),
                                  _mm512_unpackhi_ps(acc[i][2], acc[i][3]));
        __m512 q = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
        __m256 h = _mm256_add_ps(_mm512_castps512_ps256(q), _mm512_extractf32x8_ps(q, 1));
        __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        float *ci = c + i * ldc;
        if (accumulate) sum = _mm_add_ps(sum, _mm_maskz_loadu_ps(store, ci));
        _mm_mask_storeu_ps(ci, store, sum);
    }
}

AVX512_TARGET
static void gemm_dot(float *C, const float *A, const float *B, int M, int N, int K,
                     int accumulate, int n0, int n1, const gemm_epilogue *epi) {
    for (int j = n0; j < n1; j += DOT_J) {
        int nj = n1 - j < DOT_J ? n1 - j : DOT_J;
        for (int i = 0; i < M; i += DOT_I) {
            int mi = M - i < DOT_I ? M - i : DOT_I;
            const float *a = A + (size_t)i * K, *b = B + (size_t)j * K;
            float *c = C + (size_t)i * N + j;
            switch (mi * 8 + nj) {
#define DOT_CASE(MI, NJ) \
                case MI * 8 + NJ: dot_body(a, b, K, c, N, accumulate, MI, NJ); break;
                DOT_CASE(4, 4) DOT_CASE(4, 3) DOT_CASE(4, 2) DOT_CASE(4, 1)
                DOT_CASE(3, 4) DOT_CASE(3, 3) DOT_CASE(3, 2) DOT_CASE(3, 1)
                DOT_CASE(2, 4) DOT_CASE(2, 3) DOT_CASE(2, 2) DOT_CASE(2, 1)
                DOT_CASE(1, 4) DOT_CASE(1, 3) DOT_CASE(1, 2) DOT_CASE(1, 1)
#undef DOT_CASE
            }
        }
    }
    if (epi) { /* a few rows: still in cache */
        edge_epilogue(epi, C, N, 0, n0, M, n1 - n0);
        if (has_finish(epi)) finish(epi, C, N, 0, n0, M, n1 - n0);
    }
}
#endif

/* Rows of C up to which B is read in place (gemm_small_m) when not transposed. */
#ifndef SMALL_M
#define SMALL_M 24
#endif

/* Below this many multiply-adds one thread beats waking the others. */
#ifndef PARALLEL_MIN_FMAS
#define PARALLEL_MIN_FMAS (40 * 40 * 40)
#endif

/* rg_sgemm_many, then epi (NULL: none) on every product. */
static void sgemm_run(int count, float *const C[], const float *const A[],
                      const float *const B[], int M, int N, int K, int trans_a, int trans_b,
                      const int accumulate[], const gemm_epilogue *epi) {
    /* A is (M, K) or (K, M) if trans_a; B is (K, N) or (N, K) if trans_b; C is (M, N).
     * Threads split C once; each computes its part of every product, in order. */
    gemm_path path = choose_path();
    int nthreads = rg_num_threads();
    if ((double)count * M * N * K < PARALLEL_MIN_FMAS) nthreads = 1;
    /* a few row panels, B read in place: threads split the columns */
    int panels = (M + path.mr - 1) / path.mr;
    if (!trans_b && M <= SMALL_M && (size_t)panels * path.mr * K <= (size_t)MC * KC) {
        int nt = (N + path.nr - 1) / path.nr;
        if (nthreads > nt) nthreads = nt;
        if (nthreads <= 1) {
            for (int i = 0; i < count; i++)
                gemm_small_m(path, C[i], A[i], B[i], M, N, K, trans_a, accumulate[i],
                             i > 0 && A[i] == A[i - 1], 0, N, epi);
            return;
        }
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int t = 0; t < nthreads; t++) {
            int n0 = (int)((long)nt * t / nthreads) * path.nr;
            int n1 = (int)((long)nt * (t + 1) / nthreads) * path.nr;
            for (int i = 0; i < count; i++)
                gemm_small_m(path, C[i], A[i], B[i], M, N, K, trans_a, accumulate[i],
                             i > 0 && A[i] == A[i - 1], n0, n1 < N ? n1 : N, epi);
        }
        return;
    }
#ifdef RG_X86
    /* a few rows, B transposed, AVX-512: dot products, threads split the columns */
    if (trans_b && !trans_a && M <= SMALL_M && path.kernel == kernel_avx512) {
        int nt = (N + DOT_J - 1) / DOT_J;
        if (nthreads > nt) nthreads = nt;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int t = 0; t < nthreads; t++) {
            int n0 = (int)((long)nt * t / nthreads) * DOT_J;
            int n1 = (int)((long)nt * (t + 1) / nthreads) * DOT_J;
            for (int i = 0; i < count; i++)
                gemm_dot(C[i], A[i], B[i], M, N, K, accumulate[i], n0, n1 < N ? n1 : N, epi);
        }
        return;
    }
#endif
    /* Split C into tm x tn <= nthreads rectangles, one per thread, along whole micro-tiles.
     * A split along M packs B again in every thread, a split along N packs A again: pick
     * the split whose busiest thread has the least compute plus packing. */
    int mt = (M + path.mr - 1) / path.mr, nt = (N + path.nr - 1) / path.nr;
    int tm = 1, tn = 1;
    double best = -1.0;
    for (int t = 1; t <= nthreads && t <= mt; t++) {
        for (int u = 1; t * u <= nthreads && u <= nt; u++) {
            double rows = (double)((mt + t - 1) / t) * path.mr;
            double cols = (double)((nt + u - 1) / u) * path.nr;
            double cost = rows * cols * (K / 16.0 + (u > 1)) + (rows + cols) * K;
            if (best < 0 || cost < best) { best = cost; tm = t; tn = u; }
        }
    }
    nthreads = tm * tn;
    if (nthreads <= 1) {
        for (int i = 0; i < count; i++)
            gemm_block(path, C[i], A[i], B[i], M, N, K, trans_a, trans_b, accumulate[i], 0, M,
                       0, N, epi);
        return;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        /* a nested call may get fewer threads than asked: each takes rectangles in turn */
#ifdef _OPENMP
        int first = omp_get_thread_num(), step = omp_get_num_threads();
#else
        int first = 0, step = 1;
#endif
        for (int t = first; t < nthreads; t += step) {
            int ti = t / tn, tj = t % tn;
            int m0 = (int)((long)mt * ti / tm) * path.mr;
            int m1 = (int)((long)mt * (ti + 1) / tm) * path.mr;
            int n0 = (int)((long)nt * tj / tn) * path.nr;
            int n1 = (int)((long)nt * (tj + 1) / tn) * path.nr;
            if (m1 > M) m1 = M;
            if (n1 > N) n1 = N;
            if (m0 < m1 && n0 < n1)
                for (int i = 0; i < count; i++)
                    gemm_block(path, C[i], A[i], B[i], M, N, K, trans_a, trans_b,
                               accumulate[i], m0, m1, n0, n1, epi);
        }
    }
}

void rg_sgemm_many(int count, float *const C[], const float *const A[], const float *const B[],
                   int M, int N, int K, int trans_a, int trans_b, const int accumulate[]) {
    sgemm_run(count, C, A, B, M, N, K, trans_a, trans_b, accumulate, NULL);
}

void rg_sgemm(float *C, const float *A, const float *B, int M, int N, int K,
              int trans_a, int trans_b, int accumulate, const float *bias, int act,
              float *pre) {
    gemm_epilogue e = {bias, act, pre, finish_rows_pick()};
    sgemm_run(1, &C, &A, &B, M, N, K, trans_a, trans_b, &accumulate,
              bias || act != RG_ACT_NONE || pre ? &e : NULL);
}
