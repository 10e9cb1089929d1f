/* rustgpt_kernels.h: the C core of rustgpt, one header for every kernel.
 *
 * Plain functions on raw row-major float32 arrays with explicit sizes. The caller
 * (src/rustgpt/_kernels.pyx) checks every shape, dtype and index; the C trusts its
 * arguments, allocates nothing on the heap and cannot fail. Backward kernels say whether
 * they overwrite or accumulate (+=) into each gradient.
 *
 * Size letters: B batch, T sequence, D embedding, H hidden, NH heads, hs = D / NH head
 * size, V vocabulary, N rows (usually B * T), C columns.
 */
#ifndef RUSTGPT_KERNELS_H
#define RUSTGPT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---- runtime: threads and SIMD dispatch (runtime.c) ---------------------------------- */

enum { RG_SIMD_GENERIC = 0, RG_SIMD_AVX2 = 1, RG_SIMD_AVX512 = 2 };

/* The best SIMD level this CPU supports (RG_SIMD_*). */
int rg_simd_supported(void);
/* The SIMD level the kernels use now; defaults to rg_simd_supported(). */
int rg_simd_level(void);
/* Use SIMD level `level`, clamped to what the CPU supports; returns the level in use. */
int rg_set_simd_level(int level);
/* 1 when compiled with OpenMP, else 0. */
int rg_has_openmp(void);
/* Threads the parallel kernels of the calling thread use (1 without OpenMP): its own
 * count if rg_set_local_threads gave one, else the process-wide rg_set_num_threads count,
 * else OpenMP's default. */
int rg_num_threads(void);
/* The count for every thread of the process (n >= 1). */
void rg_set_num_threads(int n);
/* The calling thread's own count (n >= 1), or none (0); returns the one it replaces. */
int rg_set_local_threads(int n);
/* Calls run(ctx, j) for j < n on two threads, each on one thread of its own: stream[j]
 * (0 or 1) says which, each in increasing j; call j starts once the other stream has
 * finished its calls up to index wait[j] (-1: none; wait[j] < j). With fewer than two
 * threads (asked for, or granted), all in order on the calling thread. */
void rg_run_streams(int n, const unsigned char *stream, const int *wait,
                    void (*run)(void *ctx, int j), void *ctx);

/* ---- matrix multiply (gemm.c) ------------------------------------------------------------ */

/* The activations rg_sgemm can apply to its result. */
enum { RG_ACT_NONE = 0, RG_ACT_RELU = 1, RG_ACT_GELU = 2 };

/* C = op(A) @ op(B), or C += op(A) @ op(B) when accumulate is nonzero; then, when given,
 * C[i, j] += bias[j] (bias: N floats, or NULL), pre = C (pre: (M, N), or NULL: the values
 * before the activation, which GELU's backward needs), and C = act(C) (RG_ACT_*): each tile
 * of C as it is finished, while it is in cache, so a layer's bias and activation take no
 * pass of their own (the same bits as rg_bias_add, then rg_relu_forward or
 * rg_gelu_forward, after the product).
 * op(A) is (M, K): A is stored (M, K), or (K, M) when trans_a.
 * op(B) is (K, N): B is stored (K, N), or (N, K) when trans_b.
 * C is (M, N). All row-major and contiguous; C and pre alias neither each other nor A, B,
 * bias. Forward x @ W is (0, 0); dx = dy @ W^T is (0, 1); dW += x^T @ dy is (1, 0). */
void rg_sgemm(float *C, const float *A, const float *B, int M, int N, int K,
              int trans_a, int trans_b, int accumulate, const float *bias, int act,
              float *pre);

/* count products of one shape and transposition in one parallel region, in order:
 * C[i] = op(A[i]) @ op(B[i]), or += when accumulate[i]. Each thread computes the same part
 * of every C[i], so a C that recurs accumulates in order: the results equal count rg_sgemm
 * calls bit for bit, at one fork and join (and one packing of an A that recurs in a row)
 * instead of count. No C[i] aliases any A[j] or B[j]. */
void rg_sgemm_many(int count, float *const C[], const float *const A[], const float *const B[],
                   int M, int N, int K, int trans_a, int trans_b, const int accumulate[]);

/* ---- bf16 matrix multiply (gemm_bf16.c) ------------------------------------------------- */

/* bf16 numbers are stored as uint16_t: the upper half of a float32. The paths of
 * rg_gemm_bf16: portable C (every CPU), AVX512-BF16 (vdpbf16ps), AMX (tdpbf16ps). */
enum { RG_BF16_PORTABLE = 0, RG_BF16_AVX512 = 1, RG_BF16_AMX = 2 };

/* Bit 1 << path set for every bf16 path this CPU runs (AMX: when Linux also granted this
 * process the tile state, asked for on the first call). */
int rg_bf16_supported(void);
/* The bf16 path rg_gemm_bf16 uses now; defaults to the best supported (AMX, AVX512-BF16,
 * portable). */
int rg_bf16_path(void);
/* Use bf16 path `path` (RG_BF16_*): 0 when done; -1 when the CPU lacks it, -2 when the OS
 * refused the AMX state (the path in use is left as it was). */
int rg_set_bf16_path(int path);

/* out[i] = x[i] rounded to bf16, to nearest, ties to even (NaN stays NaN, overflow gives
 * infinity). x, out: (n). Overwrites out. */
void rg_to_bf16(uint16_t *out, const float *x, size_t n);

/* C = op(A) @ op(B), or C += op(A) @ op(B) when accumulate, with every operand rounded to
 * bf16 and the products summed in float32; then bias, pre and act as rg_sgemm's (the same
 * bits as rg_bias_add, then rg_relu_forward or rg_gelu_forward). op(B) comes from B
 * (float32, rounded as it is packed) or from Bh (bf16, its copy: a model's weights),
 * whichever is not NULL; for M <= 16 rows and Bh, Bh is read in place on every CPU (the
 * decoding path). Shapes and transposes as rg_sgemm's; C and pre alias nothing. */
void rg_gemm_bf16(float *C, const float *A, const float *B, const uint16_t *Bh, int M, int N,
                  int K, int trans_a, int trans_b, int accumulate, const float *bias, int act,
                  float *pre);

/* The packed operands every bf16 path reads (for tests). op(A) (M, K) as bf16 rows of
 * Kp = K rounded up to 32, zeros past K and in rows M to M rounded up to mr: dst (Mp, Kp).
 * op(B) (K, N) in panels of 32 columns, panel c holding Kp / 2 rows of 32 pairs:
 * dst[c][q][j][r] = bf16(op(B)[2q + r, 32c + j]), zeros past K and N (the VNNI pair layout
 * of vdpbf16ps and of AMX's B tiles): dst (ceil(N / 32), Kp / 2, 32, 2). B or Bh as in
 * rg_gemm_bf16. */
void rg_bf16_pack_a(uint16_t *dst, const float *A, int M, int K, int trans_a, int mr);
void rg_bf16_pack_b(uint16_t *dst, const float *B, const uint16_t *Bh, int N, int K,
                    int trans_b);

/* ---- causal multi-head attention (attention.c) ---------------------------------------- */

/* Floats of scratch rg_attention_forward and rg_attention_backward need per thread, for
 * sequences of T: about hs (2 T + 32) with hs = D / NH, hs (T + 32) when NH = 1. */
size_t rg_attention_scratch_size(int T, int D, int NH);

/* out = softmax(q k^T / sqrt(hs) + causal mask) v, per batch row and head.
 * q, k, v, out: (B, T, D), head h owns columns [h*hs, (h+1)*hs).
 * att: (B, NH, T, T), the softmax probabilities saved for backward (entries above the
 * diagonal are written as 0). scratch: (areas, rg_attention_scratch_size(T, D, NH)), one
 * area per thread: the kernel runs on at most `areas` threads. Overwrites out, att and
 * scratch. */
void rg_attention_forward(float *out, float *att, float *scratch, const float *q,
                          const float *k, const float *v, int B, int T, int D, int NH,
                          int areas);

/* Backward of rg_attention_forward. dout, q, k, v: (B, T, D); att: (B, NH, T, T) from the
 * forward. Overwrites dq, dk, dv: (B, T, D), ds: (B, NH, T, T), scratch that gets the
 * gradients of the scaled scores (on and below the diagonal; other entries unspecified),
 * and scratch: (areas, rg_attention_scratch_size(T, D, NH)), as the forward's. */
void rg_attention_backward(float *dq, float *dk, float *dv, float *ds, float *scratch,
                           const float *dout, const float *att, const float *q,
                           const float *k, const float *v, int B, int T, int D, int NH,
                           int areas);

/* One decoding step against a KV cache, each batch row at its own position: row b's query
 * (position n[b]-1) attends to its cache rows 0..n[b]-1 (which already hold that position's
 * k and v); rows of different lengths share the call (a server's requests).
 * q, out: (B, D); kcache, vcache: (B, Tmax, D); n: (B), 1 <= n[b] <= Tmax; scratch:
 * (B, NH, Tmax), left unspecified. Overwrites out and scratch. */
void rg_attention_step(float *out, float *scratch, const float *q, const float *kcache,
                       const float *vcache, const int *n, int B, int Tmax, int D, int NH);

/* ---- layer norm (layernorm.c) ---------------------------------------------------------- */

/* out = (x - mean) * rstd * g + b, row by row, rstd = 1 / sqrt(var + eps).
 * x, out: (N, D); g: (D); b: (D), or NULL for none; mean, rstd: (N), saved for backward.
 * Overwrites out, mean, rstd. out may alias x. */
void rg_layernorm_forward(float *out, float *mean, float *rstd, const float *x,
                          const float *g, const float *b, int N, int D, float eps);

/* Backward of rg_layernorm_forward. dout, x: (N, D); g: (D); mean, rstd: (N).
 * Overwrites dx: (N, D) (dx may alias dout); adds into dg, db: (D) when accumulate,
 * else overwrites them; db may be NULL (a norm without b). */
void rg_layernorm_backward(float *dx, float *dg, float *db, const float *dout,
                           const float *x, const float *g, const float *mean,
                           const float *rstd, int N, int D, int accumulate);

/* ---- softmax cross-entropy (crossentropy.c) ------------------------------------------ */

/* losses[i] = -log softmax(logits[i])[targets[i]], and hits[i] = 1 when logits[i] has no
 * element above logits[i][targets[i]] (the prediction is right, ties counted), else 0;
 * both 0 where targets[i] == ignore_index. logits: (N, V); targets, losses, hits: (N).
 * Overwrites losses, hits. */
void rg_crossentropy_forward(float *losses, int *hits, const float *logits,
                             const int *targets, int N, int V, int ignore_index);

/* The forward above fused with its gradient:
 * dlogits[i] = (softmax(logits[i]) - onehot(targets[i])) * dscale, zero rows where
 * targets[i] == ignore_index. dlogits: (N, V), may alias logits. Overwrites losses,
 * dlogits, hits. */
void rg_crossentropy_forward_backward(float *losses, float *dlogits, int *hits,
                                      const float *logits, const int *targets, int N, int V,
                                      int ignore_index, float dscale);

/* ---- Adam / AdamW and the gradient norm (adam.c) ------------------------------------------- */

/* One Adam step over a flat buffer of n parameters, at step t >= 1, with the gradient
 * clipped to global L2 norm max_norm (no clipping when max_norm <= 0):
 *   norm = sqrt(sum of grads^2);  s = max_norm / norm if 0 < max_norm < norm, else 1
 *   g = grads * s
 *   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
 *   params -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
 *             + lr * weight_decay * params      (decoupled, AdamW; 0 gives Adam)
 * The weight decay applies only inside the ndecay ranges [decay[2j], decay[2j + 1]) of the
 * buffer (decay: (ndecay, 2), ascending, disjoint, within n; the model's matrices), the
 * other elements take none. Overwrites params, m, v in place and returns norm; when norm
 * is NaN or infinite they are left as they were. */
double rg_adam_update(float *params, float *m, float *v, const float *grads, size_t n,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      const size_t *decay, size_t ndecay, int t, double max_norm);

/* rg_adam_update's step with the norm already known (rg_sum_squares' root; it must be
 * finite), overlapped with work(ctx, u): thread 0 runs work on one thread while the others
 * update, in pieces in buffer order; work calls rg_update_wait(u, end) before it reads
 * params[0, end), which helps with the update until that part is done, and may return
 * early once rg_update_busy(u) is 0 (every piece taken: the rest of its work would run
 * better on every thread, after this call). Thread 0 helps too once work returns. The
 * same params, m, v as rg_adam_update, bit for bit. With one thread, or work NULL, the
 * update runs first. */
typedef struct rg_update rg_update;
void rg_adam_apply(float *params, float *m, float *v, const float *grads, size_t n,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   const size_t *decay, size_t ndecay, int t, double max_norm, double norm,
                   void (*work)(void *, rg_update *), void *ctx);
void rg_update_wait(rg_update *u, size_t end);
int rg_update_busy(rg_update *u);

/* Sum of x[i]^2 in double, summed in a fixed order whatever the thread count (fixed
 * chunks, their sums added in order; rg_adam_update's norm is the same sum). x: (n). */
double rg_sum_squares(const float *x, size_t n);
/* rg_sum_squares in pieces, for a caller that takes them as the data becomes ready: the
 * size of its chunks over n elements (the last may be shorter), the sum of chunk c into
 * *part, and the total of the chunks' sums in order (the same bits as rg_sum_squares). */
size_t rg_sum_squares_chunk(size_t n);
void rg_sum_squares_part(double *part, const float *x, size_t n, int c);
double rg_sum_squares_total(const double *parts, int count);

/* ---- elementwise, bias, embedding (elementwise.c) -------------------------------------- */

/* out = max(x, 0). x, out: (n); out may alias x. */
void rg_relu_forward(float *out, const float *x, size_t n);
/* dx = dout where out > 0, else 0. out is the forward's output. dx may alias dout. */
void rg_relu_backward(float *dx, const float *dout, const float *out, size_t n);

/* out = gelu(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, the exact form (erf within
 * 1.5e-7, see simd.h). x, out: (n); out may alias x. */
void rg_gelu_forward(float *out, const float *x, size_t n);
/* dx = dout * gelu'(x) = dout * (Phi(x) + x e^(-x^2/2) / sqrt(2 pi)); x is the forward's
 * input. dx: (n), may alias dout. */
void rg_gelu_backward(float *dx, const float *dout, const float *x, size_t n);

/* Dropout: out = x / (1 - p) where element i is kept, 0 where it is dropped (probability p,
 * 0 <= p < 1). The mask is a counter-based hash of (seed[0], seed[1], site, seed[2] * row
 * + i), never stored: the same seed and site give the same mask, so dropout's backward is
 * this call on the gradient, and a replayed plan draws the mask of the seed its array holds
 * then. seed[2] is the first row's index in the whole batch (a data-parallel process holds
 * rows seed[2].. of it), so a row's mask does not depend on which process holds it.
 * x, out: (n), rows of `row` elements, out may alias x; seed: 3 ints. */
void rg_dropout(float *out, const float *x, size_t n, size_t row, float p, const int *seed,
                int site);

/* out = a + b. a, b, out: (n); out may alias a or b (residual connections). */
void rg_add(float *out, const float *a, const float *b, size_t n);
/* x[i, :] += b. x: (N, C); b: (C). */
void rg_bias_add(float *x, const float *b, int N, int C);
/* db (+)= sum over rows of dy: adds when accumulate, else overwrites. dy: (N, C); db: (C). */
void rg_colsum(float *db, const float *dy, int N, int C, int accumulate);

/* out[b, t, :] = wte[ids[b, t], :] + wpe[t, :].
 * ids: (B, T) in [0, V); wte: (V, D); wpe: (Tmax, D) with T <= Tmax; out: (B, T, D). */
void rg_embedding_forward(float *out, const int *ids, const float *wte, const float *wpe,
                          int B, int T, int D);
/* dwte[ids[b, t], :] += dout[b, t, :]; dwpe[t, :] += dout[b, t, :], dwte: (V, D) first
 * set to zero unless accumulate_wte, dwpe: (Tmax, D) unless accumulate_wpe (a tied output
 * projection has written its part of dwte already). */
void rg_embedding_backward(float *dwte, float *dwpe, const float *dout, const int *ids,
                           int B, int T, int D, int V, int Tmax, int accumulate_wte,
                           int accumulate_wpe);

#endif /* RUSTGPT_KERNELS_H */
