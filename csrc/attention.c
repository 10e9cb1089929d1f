/* attention.c: causal multi-head softmax attention, forward, backward and one KV-cache step.
 *
 * Layout: q, k, v, out and their gradients are (B, T, D); head h owns columns
 * [h*hs, (h+1)*hs), so the rows of one head are hs floats apart by a stride of D.
 * att is (B, NH, T, T).
 *
 * Two block kernels do all the arithmetic, on up to RT rows at a time:
 *   scores_block: S = scale * Q K^T   (RT query rows against n keys)
 *   mix_block:    Y = P X             (RT rows of weights over n value rows)
 * Both keep an RT x 16 tile of results in registers and never reduce across
 * vector lanes: scores_block reads the keys transposed (transpose_keys, once per task), so
 * its inner loop is a broadcast-multiply-add, like mix_block's.
 * They are compiled three times (generic, AVX2, AVX-512) and rg_simd_level() picks one at
 * run time.
 *
 * Scratch: the caller's, one area of rg_attention_scratch_size floats per thread, which the
 * thread reuses for every task it takes (so it stays in cache). A task keeps there its
 * head's keys (or values) transposed, up to hs * (T + 32) floats, and, when hs < D, its
 * head's rows packed (pack_rows), up to hs * T floats; the key rows' pass two blocks of rows
 * instead. Nothing lives on the stack, so T is bounded only by the caller's arrays. The
 * backward's score gradients go to the caller's ds.
 *
 * Threads: a task is (batch row b, head h, a range of rows). Each task writes only its own
 * rows of out / att / ds / dq / dk / dv and its thread's area, so there are no atomics. When
 * B * NH alone cannot keep every thread busy, each head's rows are cut into ranges of equal
 * triangular cost; each range's task fills its area with the rows it reads (the pieces of a
 * head repeat a little of that work, which costs less than a barrier and reading another
 * core's copy). The backward runs in two passes: over query rows (the score gradients ds,
 * row by row, and dq), then over key rows (dk, dv), which read the columns of ds and att.
 */
#include <stdint.h>
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define RT 4  /* rows per block */
#define KW 16 /* keys per transposed tile in scores_block */
#define CW 16 /* columns per register tile in mix_block */

typedef float f32x16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef float f32x8 __attribute__((vector_size(32), aligned(4), may_alias));

/* ---- block kernels (inlined into each SIMD variant) ----------------------------------- */

/* kt[i, j] = k[j, i] for j < n, zero for n <= j < ldt. k: n rows (stride D) of hs floats;
 * kt: (hs, ldt) with ldt >= n + KW, so a tile of KW keys may start at any j < n. */
static inline __attribute__((always_inline))
void transpose_keys(float *kt, int ldt, const float *k, int n, int D, int hs) {
    rg_transpose(kt, k, (size_t)D, n, ldt, hs, 1);
}

/* Row stride of transpose_keys' copy of n keys. */
static int kt_stride(int n) { return (n + KW - 1) / KW * KW + KW; }

/* An area of scratch: keys transposed for T keys and, when hs < D, T rows packed (the key
 * rows' pass needs at most 2 hs T, which is less), in whole cache lines, and one more that
 * lets the first area start on a line (see area). */
size_t rg_attention_scratch_size(int T, int D, int NH) {
    size_t hs = (size_t)(D / NH), need = hs * kt_stride(T) + (hs < (size_t)D ? hs * T : 0);
    return (need + 15) / 16 * 16 + 16;
}

/* The head's n rows of x (hs floats each, at a row stride of D) as mix_block reads them:
 * copied to xp, contiguous, when other heads' columns lie between them (hs < D); else x
 * itself, whose rows are contiguous already. Returns the rows' stride. */
static inline __attribute__((always_inline))
int pack_rows(const float **rows, float *xp, const float *x, int n, int D, int hs) {
    if (hs == D) {
        *rows = x;
        return D;
    }
    for (int j = 0; j < n; j++) memcpy(xp + (size_t)j * hs, x + (size_t)j * D, hs * sizeof(float));
    *rows = xp;
    return hs;
}

/* acc[r] = lo[r] then hi[r], r < RT: the AVX2 loops' pairs of 8-lane results as the
 * blocks' 16-lane rows. */
static inline __attribute__((always_inline))
void join_halves(f32x16 *acc, const f32x8 *lo, const f32x8 *hi) {
    for (int r = 0; r < RT; r++) {
        memcpy((float *)&acc[r], &lo[r], sizeof lo[r]);
        memcpy((float *)&acc[r] + 8, &hi[r], sizeof hi[r]);
    }
}

/* S[r, j] = scale * q_r . k_j for r < nr, j < n, with the keys given transposed.
 * q: nr rows (stride D) of hs floats; kt: (hs, ldt) from transpose_keys; S: (nr, lds).
 * Rows past nr repeat the last row; their results are dropped. */
static inline __attribute__((always_inline))
void scores_block(int wide, float *S, int lds, const float *q, int nr, const float *kt,
                  int ldt, int n, int D, int hs, float scale) {
    const float *q_r[RT];
    for (int r = 0; r < RT; r++) q_r[r] = q + (size_t)(r < nr ? r : nr - 1) * D;
    for (int j0 = 0; j0 < n; j0 += KW) {
        int nk = n - j0 < KW ? n - j0 : KW;
        f32x16 acc[RT] = {0};
        if (wide == 1) {
            for (int i = 0; i < hs; i++) {
                f32x16 kt_i = *(const f32x16 *)(kt + (size_t)i * ldt + j0);
                for (int r = 0; r < RT; r++) acc[r] += q_r[r][i] * kt_i;
            }
        } else if (wide == 2) { /* AVX2: each 16-lane row as two 8-lane registers */
            f32x8 lo[RT] = {0}, hi[RT] = {0};
            for (int i = 0; i < hs; i++) {
                const float *kt_i = kt + (size_t)i * ldt + j0;
                f32x8 k0 = *(const f32x8 *)kt_i, k1 = *(const f32x8 *)(kt_i + 8);
                for (int r = 0; r < RT; r++) {
                    lo[r] += q_r[r][i] * k0;
                    hi[r] += q_r[r][i] * k1;
                }
            }
            join_halves(acc, lo, hi);
        } else { /* the same loop on floats, left to the auto-vectorizer */
            float a[RT][KW] = {{0}};
            for (int i = 0; i < hs; i++) {
                const float *kt_i = kt + (size_t)i * ldt + j0;
                for (int r = 0; r < RT; r++)
                    for (int j = 0; j < KW; j++) a[r][j] += q_r[r][i] * kt_i[j];
            }
            memcpy(acc, a, sizeof(a));
        }
        for (int r = 0; r < RT; r++) { /* constant r, so acc stays in registers */
            if (r >= nr) break;
            f32x16 s = acc[r] * scale;
            if (nk == KW) *(f32x16 *)(S + (size_t)r * lds + j0) = s;
            else memcpy(S + (size_t)r * lds + j0, &s, (size_t)nk * sizeof(float));
        }
    }
}

/* y_r = sum_j P[r, j] x_j for r < nr, j < n. Overwrites y.
 * P[r, j] at P + r * ldp + j * pj: rows of a matrix (pj = 1), or columns (ldp = 1, pj = its
 * row stride; the key rows' pass reads ds and att so, down from the diagonal).
 * x: n rows (stride ldx) of hs floats; y: nr rows (stride D). The tasks pass
 * a head's rows packed (see pack_rows): at a stride of D = 256 or more floats the rows of a
 * column tile fall into a few L1 sets and evict each other before the next tile reuses them. */
static inline __attribute__((always_inline))
void mix_block(int wide, float *y, const float *P, int ldp, int pj, int nr, const float *x,
               int ldx, int n, int D, int hs) {
    const float *p_r[RT];
    for (int r = 0; r < RT; r++) p_r[r] = P + (size_t)(r < nr ? r : nr - 1) * ldp;
    int c0 = 0;
    for (; c0 + CW <= hs; c0 += CW) {
        f32x16 acc[RT] = {0};
        if (wide == 1) {
            for (int j = 0; j < n; j++) {
                f32x16 x_j = *(const f32x16 *)(x + (size_t)j * ldx + c0);
                for (int r = 0; r < RT; r++) acc[r] += p_r[r][(size_t)j * pj] * x_j;
            }
        } else if (wide == 2) { /* AVX2: each 16-lane row as two 8-lane registers */
            f32x8 lo[RT] = {0}, hi[RT] = {0};
            for (int j = 0; j < n; j++) {
                const float *x_j = x + (size_t)j * ldx + c0;
                f32x8 x0 = *(const f32x8 *)x_j, x1 = *(const f32x8 *)(x_j + 8);
                for (int r = 0; r < RT; r++) {
                    float p = p_r[r][(size_t)j * pj];
                    lo[r] += p * x0;
                    hi[r] += p * x1;
                }
            }
            join_halves(acc, lo, hi);
        } else { /* the same loop on floats, left to the auto-vectorizer */
            float a[RT][CW] = {{0}};
            for (int j = 0; j < n; j++) {
                const float *x_j = x + (size_t)j * ldx + c0;
                for (int r = 0; r < RT; r++)
                    for (int c = 0; c < CW; c++) a[r][c] += p_r[r][(size_t)j * pj] * x_j[c];
            }
            memcpy(acc, a, sizeof(a));
        }
        for (int r = 0; r < RT; r++) {
            if (r >= nr) break;
            *(f32x16 *)(y + (size_t)r * D + c0) = acc[r];
        }
    }
    for (int r = 0; r < nr && c0 < hs; r++) { /* the last hs % CW columns */
        float *y_r = y + (size_t)r * D;
        for (int c = c0; c < hs; c++) y_r[c] = 0.0f;
        for (int j = 0; j < n; j++) {
            const float *x_j = x + (size_t)j * ldx;
            for (int c = c0; c < hs; c++) y_r[c] += p_r[r][(size_t)j * pj] * x_j[c];
        }
    }
}

/* s[0..n) = softmax(s[0..n)), shifted by the max so large scores cannot overflow; the
 * exponentials vectorize through rg_expf. */
static inline __attribute__((always_inline))
void softmax_row(float *s, int n) {
    float mx = -INFINITY, sum = 0.0f, lane[16];
    int j0 = n & ~15;
    for (int l = 0; l < 16; l++) lane[l] = -INFINITY; /* 16 running maxima: they vectorize */
    for (int j = 0; j < j0; j += 16)
        for (int l = 0; l < 16; l++) lane[l] = s[j + l] > lane[l] ? s[j + l] : lane[l];
    for (int j = j0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    for (int l = 0; l < 16; l++) mx = lane[l] > mx ? lane[l] : mx;
    #pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        s[j] = rg_expf(s[j] - mx);
        sum += s[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < n; j++) s[j] *= inv;
}

/* ---- per-task work, one head (b, h) ----------------------------------------------------- */
/* Pointers arrive seeked to the head: q, k, v, out, dq, ... at [b, 0, h*hs] (row stride D),
 * att and ds at [b, h, 0, 0] (T, T). */

/* Forward for query rows [t0, t1): att rows and out rows. sc: the thread's area. */
static inline __attribute__((always_inline))
void forward_rows(int wide, float *out, float *att, float *sc, const float *q,
                  const float *k, const float *v, int T, int D, int hs, int t0, int t1) {
    float scale = 1.0f / sqrtf((float)hs);
    int ldt = kt_stride(t1);
    float *kt = sc, *vp = sc + (size_t)hs * ldt;
    const float *vh;
    int ldv = pack_rows(&vh, vp, v, t1, D, hs);
    transpose_keys(kt, ldt, k, t1, D, hs);
    for (int t = t0; t < t1; t += RT) {
        int nr = t1 - t < RT ? t1 - t : RT;
        int n = t + nr; /* keys 0..t+nr-1 cover every row of the block */
        float *att_t = att + (size_t)t * T;
        scores_block(wide, att_t, T, q + (size_t)t * D, nr, kt, ldt, n, D, hs, scale);
        for (int r = 0; r < nr; r++) {
            float *att_r = att_t + (size_t)r * T;
            softmax_row(att_r, t + r + 1);
            memset(att_r + t + r + 1, 0, (size_t)(T - t - r - 1) * sizeof(float));
        }
        mix_block(wide, out + (size_t)t * D, att_t, T, 1, nr, vh, ldv, n, D, hs);
    }
}

/* Backward pass 1, query rows [t0, t1): rows of ds and of dq. Row t of ds is written on and
 * below the diagonal and zero for the RT - 1 keys after it (and on to the block's last key),
 * which the key rows' pass reads as the upper corners of its blocks. In the forward,
 * out_t = sum_j att[t, j] v_j and att[t] = softmax(scale * q_t . k_j), so with
 * datt[t, j] = dout_t . v_j,
 *   ds[t, j] = att[t, j] (datt[t, j] - sum_i att[t, i] datt[t, i]) * scale,
 *   dq_t = sum_j ds[t, j] k_j. */
static inline __attribute__((always_inline))
void backward_query_rows(int wide, float *dq, float *ds, float *sc, const float *dout,
                         const float *att, const float *k, const float *v, int T, int D,
                         int hs, int t0, int t1) {
    float scale = 1.0f / sqrtf((float)hs);
    int ldt = kt_stride(t1);
    float *vt = sc, *kp = sc + (size_t)hs * ldt;
    const float *kh;
    int ldk = pack_rows(&kh, kp, k, t1, D, hs);
    transpose_keys(vt, ldt, v, t1, D, hs);
    for (int t = t0; t < t1; t += RT) {
        int nr = t1 - t < RT ? t1 - t : RT;
        int n = t + nr;
        float *ds_t = ds + (size_t)t * T;
        scores_block(wide, ds_t, T, dout + (size_t)t * D, nr, vt, ldt, n, D, hs, 1.0f);
        for (int r = 0; r < nr; r++) {
            const float *att_r = att + (size_t)(t + r) * T;
            float *ds_r = ds_t + (size_t)r * T;
            float d = 0.0f;
            for (int j = 0; j <= t + r; j++) d += att_r[j] * ds_r[j];
            for (int j = 0; j <= t + r; j++) ds_r[j] = att_r[j] * (ds_r[j] - d) * scale;
            int z = t + r + RT < T ? t + r + RT : T;
            for (int j = t + r + 1; j < (z > n ? z : n); j++) ds_r[j] = 0.0f;
        }
        mix_block(wide, dq + (size_t)t * D, ds_t, T, 1, nr, kh, ldk, n, D, hs);
    }
}

/* Backward pass 2, key rows [j0, j1), given the rows of ds from pass 1:
 *   dk_j = sum_{t >= j} ds[t, j] q_t,  dv_j = sum_{t >= j} att[t, j] dout_t.
 * Each block of key rows reads its columns of ds and att from the diagonal down; the
 * entries above the diagonal in its first rows are zero in both. */
static inline __attribute__((always_inline))
void backward_key_rows(int wide, float *dk, float *dv, float *sc, const float *ds,
                       const float *dout, const float *att, const float *q, int T, int D,
                       int hs, int j0, int j1) {
    float *qp = sc, *dp = sc + (size_t)hs * (T - j0);
    const float *qh, *dh; /* q and dout rows j0..T-1 */
    int ldq = pack_rows(&qh, qp, q + (size_t)j0 * D, T - j0, D, hs);
    int ldd = pack_rows(&dh, dp, dout + (size_t)j0 * D, T - j0, D, hs);
    for (int j = j0; j < j1; j += RT) {
        int nr = j1 - j < RT ? j1 - j : RT;
        int n = T - j; /* query rows j..T-1 */
        size_t at = (size_t)j * T + j; /* [j, j] */
        mix_block(wide, dk + (size_t)j * D, ds + at, 1, T, nr, qh + (size_t)(j - j0) * ldq, ldq,
                  n, D, hs);
        mix_block(wide, dv + (size_t)j * D, att + at, 1, T, nr, dh + (size_t)(j - j0) * ldd,
                  ldd, n, D, hs);
    }
}

/* One query against n cached keys; out, q: hs floats; kc, vc: n rows (stride D); s: n
 * floats of scratch, the scores. One pass over the keys, then one over the values: a
 * single row gains nothing from scores_block's and mix_block's tiles, and mix_block would
 * read the values hs / 16 times. */
static inline __attribute__((always_inline))
void step_head(int wide, float *out, float *s, const float *q, const float *kc,
               const float *vc, int n, int D, int hs) {
    float scale = 1.0f / sqrtf((float)hs);
    for (int j = 0; j < n; j++) { /* 16 running sums per dot product, then their total */
        const float *k_j = kc + (size_t)j * D;
        float d = 0.0f;
        int i = 0;
        if (hs >= 16 && wide == 1) {
            f32x16 acc = *(const f32x16 *)q * *(const f32x16 *)k_j;
            for (i = 16; i + 16 <= hs; i += 16)
                acc += *(const f32x16 *)(q + i) * *(const f32x16 *)(k_j + i);
            for (int l = 0; l < 16; l++) d += acc[l];
        } else if (hs >= 16) { /* the same on floats, left to the auto-vectorizer */
            float acc[16];
            for (int l = 0; l < 16; l++) acc[l] = q[l] * k_j[l];
            for (i = 16; i + 16 <= hs; i += 16)
                for (int l = 0; l < 16; l++) acc[l] += q[i + l] * k_j[i + l];
            for (int l = 0; l < 16; l++) d += acc[l];
        }
        for (; i < hs; i++) d += q[i] * k_j[i];
        s[j] = d * scale;
    }
    softmax_row(s, n);
    for (int c = 0; c < hs; c++) out[c] = 0.0f;
    for (int j = 0; j < n; j++) { /* out = sum_j s_j v_j */
        const float *v_j = vc + (size_t)j * D;
        float s_j = s[j];
        for (int c = 0; c < hs; c++) out[c] += s_j * v_j[c];
    }
}

/* ---- the three SIMD variants of each task ----------------------------------------------- */

/* AVX-512 runs the explicit 16-lane loops (wide = 1), AVX2 the blocks' loops on pairs of
 * 8-lane vectors (wide = 2: GCC keeps 64-byte vectors it must split into halves in memory)
 * and its float loops elsewhere, generic the float loops. */
RG_VARIANTS_AVX2(forward_rows, 2,
         (float *out, float *att, float *sc, const float *q, const float *k, const float *v,
          int T, int D, int hs, int t0, int t1),
         (out, att, sc, q, k, v, T, D, hs, t0, t1))
RG_VARIANTS_AVX2(backward_query_rows, 2,
         (float *dq, float *ds, float *sc, const float *dout, const float *att,
          const float *k, const float *v, int T, int D, int hs, int t0, int t1),
         (dq, ds, sc, dout, att, k, v, T, D, hs, t0, t1))
RG_VARIANTS_AVX2(backward_key_rows, 2,
         (float *dk, float *dv, float *sc, const float *ds, const float *dout,
          const float *att, const float *q, int T, int D, int hs, int j0, int j1),
         (dk, dv, sc, ds, dout, att, q, T, D, hs, j0, j1))
RG_VARIANTS(step_head,
         (float *out, float *s, const float *q, const float *kc, const float *vc, int n,
          int D, int hs),
         (out, s, q, kc, vc, n, D, hs))

/* ---- splitting the work over threads -------------------------------------------------- */

/* Threads worth waking: one for small problems (B * NH * T^2 * hs / 2 multiply-adds
 * under 2^14, a few microseconds), where a parallel region costs more than it saves. A
 * batch-1 training step at T = 17 already gains from two threads. At most one per area of
 * scratch. */
static int threads_for(int BNH, int T, int hs, int areas) {
    int nt = (double)BNH * T * T * hs < 32768.0 ? 1 : rg_num_threads();
    return nt < areas ? nt : areas;
}

/* Pieces each head's rows are cut into for nt threads: 1 when the B * NH heads spread
 * evenly over the threads (or are many), else one piece per thread. */
static int pieces_per_head(int BNH, int T, int nt) {
    if (BNH % nt == 0 || BNH >= 8 * nt) return 1;
    return nt < T ? nt : T;
}

/* The calling thread's area of scratch (S floats each), on a cache line: the areas start
 * at scratch rounded up to 64 bytes (the keys' tiles are read 64 bytes at a time). */
static float *area(float *scratch, size_t S) {
    float *first = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
#ifdef _OPENMP
    return first + (size_t)omp_get_thread_num() * S;
#else
    return first;
#endif
}

/* First row of piece c of P when row t costs t + 1 (query rows, a lower triangle). */
static int query_split(int T, int c, int P) {
    return (int)(T * sqrt((double)c / P) + 0.5);
}

/* First row of piece c of P when row j costs T - j (key rows, the same triangle). */
static int key_split(int T, int c, int P) {
    return T - query_split(T, P - c, P);
}

/* ---- public kernels --------------------------------------------------------------------- */

void rg_attention_forward(float *out, float *att, float *scratch, const float *q,
                          const float *k, const float *v, int B, int T, int D, int NH,
                          int areas) {
    int hs = D / NH, BNH = B * NH, nt = threads_for(BNH, T, hs, areas);
    int P = pieces_per_head(BNH, T, nt);
    size_t S = rg_attention_scratch_size(T, D, NH);
    void (*fwd)(float *, float *, float *, const float *, const float *, const float *, int,
                int, int, int, int) = forward_rows_pick();
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int task = 0; task < BNH * P; task++) {
        int b = task / P / NH, h = task / P % NH, c = task % P;
        size_t x = (size_t)b * T * D + h * hs; /* seek to [b, 0, h*hs] */
        fwd(out + x, att + (size_t)(b * NH + h) * T * T, area(scratch, S), q + x, k + x, v + x,
            T, D, hs, query_split(T, c, P), query_split(T, c + 1, P));
    }
}

void rg_attention_backward(float *dq, float *dk, float *dv, float *ds, float *scratch,
                           const float *dout, const float *att, const float *q,
                           const float *k, const float *v, int B, int T, int D, int NH,
                           int areas) {
    int hs = D / NH, BNH = B * NH, nt = threads_for(BNH, T, hs, areas);
    int P = pieces_per_head(BNH, T, nt);
    size_t S = rg_attention_scratch_size(T, D, NH);
    void (*query_rows)(float *, float *, float *, const float *, const float *, const float *,
                       const float *, int, int, int, int, int) = backward_query_rows_pick();
    void (*key_rows)(float *, float *, float *, const float *, const float *, const float *,
                     const float *, int, int, int, int, int) = backward_key_rows_pick();
    if (P == 1) { /* one task per head: both passes */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int bh = 0; bh < BNH; bh++) {
            size_t x = (size_t)(bh / NH) * T * D + (bh % NH) * hs; /* [b, 0, h*hs] */
            size_t y = (size_t)bh * T * T;                          /* [b, h, 0, 0] */
            float *sc = area(scratch, S);
            query_rows(dq + x, ds + y, sc, dout + x, att + y, k + x, v + x, T, D, hs, 0, T);
            key_rows(dk + x, dv + x, sc, ds + y, dout + x, att + y, q + x, T, D, hs, 0, T);
        }
        return;
    }
    #pragma omp parallel num_threads(nt)
    {
        float *sc = area(scratch, S);
        #pragma omp for schedule(static)
        for (int task = 0; task < BNH * P; task++) {
            int bh = task / P, c = task % P;
            size_t x = (size_t)(bh / NH) * T * D + (bh % NH) * hs, y = (size_t)bh * T * T;
            query_rows(dq + x, ds + y, sc, dout + x, att + y, k + x, v + x, T, D, hs,
                       query_split(T, c, P), query_split(T, c + 1, P));
        }
        #pragma omp for schedule(static)
        for (int task = 0; task < BNH * P; task++) {
            int bh = task / P, c = task % P;
            size_t x = (size_t)(bh / NH) * T * D + (bh % NH) * hs, y = (size_t)bh * T * T;
            key_rows(dk + x, dv + x, sc, ds + y, dout + x, att + y, q + x, T, D, hs,
                     key_split(T, c, P), key_split(T, c + 1, P));
        }
    }
}

void rg_attention_step(float *out, float *scratch, const float *q, const float *kcache,
                       const float *vcache, const int *n, int B, int Tmax, int D, int NH) {
    int hs = D / NH;
    size_t keys = 0; /* multiply-adds / (2 NH hs): the keys all rows read */
    for (int b = 0; b < B; b++) keys += (size_t)n[b];
    void (*head)(float *, float *, const float *, const float *, const float *, int, int,
                 int) = step_head_pick();
    #pragma omp parallel for num_threads(rg_num_threads()) schedule(static) \
        if (keys * NH * hs > 65536)
    for (int bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        size_t x = (size_t)b * D + h * hs, xc = (size_t)b * Tmax * D + h * hs;
        head(out + x, scratch + (size_t)bh * Tmax, q + x, kcache + xc, vcache + xc, n[b], D,
             hs);
    }
}
