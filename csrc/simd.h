/* simd.h: private to csrc/. Run-time SIMD variants of a kernel's inner function, a
 * vectorizable e^x and GELU, and the transpose gemm's packing and attention share. The default build
 * has no -march flag, so each hot inner function is compiled three times (generic, AVX2,
 * AVX-512) and rg_simd_level() picks one per call. */
#ifndef RUSTGPT_SIMD_H
#define RUSTGPT_SIMD_H

#include <math.h>
#include <string.h>
#include "rustgpt_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RG_X86 1
#endif

#ifndef RG_AVX512 /* tests/avx512_generic.c defines it empty: the variants for this CPU */
#define RG_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma")))
#endif
#define RG_AVX2 __attribute__((target("avx2,fma")))
#define RG_INLINE static inline __attribute__((always_inline))
#define RG_UNPAREN(...) __VA_ARGS__

/* From `RG_INLINE void name(int wide, params...)` make name_generic / _avx2 / _avx512 and
 * name_pick(), which returns the variant for the current SIMD level. `wide` is 1 only in the
 * AVX-512 variant, for bodies that use explicit 16-lane vectors there; RG_VARIANTS_AVX2
 * passes the AVX2 variant `avx2_wide` instead of 0 (2: a body's own 8-lane loops). */
#define RG_VARIANTS(name, params, args) RG_VARIANTS_AVX2(name, 0, params, args)
#define RG_VARIANTS_AVX2(name, avx2_wide, params, args)                                  \
    static void name##_generic params { name(0, RG_UNPAREN args); }                     \
    RG_AVX2 static void name##_avx2 params { name(avx2_wide, RG_UNPAREN args); }        \
    RG_AVX512 static void name##_avx512 params { name(1, RG_UNPAREN args); }            \
    static void (*name##_pick(void)) params {                                           \
        int level = rg_simd_level();                                                    \
        return level == RG_SIMD_AVX512 ? name##_avx512                                  \
             : level == RG_SIMD_AVX2 ? name##_avx2 : name##_generic;                    \
    }

/* m ? a : b without a branch. GCC does not turn `m ? a : b` into a vector blend when an arm
 * does arithmetic of its own (under the default -ftrapping-math it will not compute an arm
 * the condition might not take), and such a loop stays scalar on SSE and AVX2; here both
 * arms are values already, blended through a mask. */
RG_INLINE float rg_select(int m, float a, float b) {
    unsigned ua, ub, mask = -(unsigned)(m != 0);
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    ua = (ua & mask) | (ub & ~mask);
    memcpy(&a, &ua, sizeof a);
    return a;
}

/* e^x by Cephes' single-precision method: x = n ln2 + r with |r| <= ln2/2, e^r by a
 * degree-6 polynomial, 2^n built in the exponent bits; about 1 ulp. Branch-free, so a loop
 * of it vectorizes. x is clamped to [-87, 88] (below -87 gives e^-87 ~ 1.6e-38, not 0);
 * NaN in gives NaN out, and never reaches the float-to-int conversion. */
RG_INLINE float rg_expf(float x) {
    float c = rg_select(x > -87.0f, x, -87.0f); /* NaN fails the comparison: c = -87 */
    c = rg_select(c < 88.0f, c, 88.0f);
    const float magic = 12582912.0f; /* 1.5 * 2^23: (y + magic) - magic rounds y */
    float n = (c * 1.44269504088896341f + magic) - magic;
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    unsigned bits = (unsigned)((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return rg_select(x == x, p * scale, x);
}

/* GELU in its exact form, gelu(x) = x Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2 the
 * normal distribution's CDF, and its derivative gelu'(x) = Phi(x) + x phi(x), phi(x) =
 * e^(-x^2/2) / sqrt(2 pi). rg_normal_tail(x, &e) is Q(|x|) = 1 - Phi(|x|) = erfc(z) / 2,
 * z = |x| / sqrt 2, by Abramowitz and Stegun 7.1.26: erfc(z) = t P(t) e^(-z^2),
 * t = 1 / (1 + 0.3275911 z), P of degree 5, error below 1.5e-7 for every z (PyTorch's float
 * erf is the same formula); e gets e^(-z^2), which the density shares. Phi(x) is Q for
 * x < 0, 1 - Q otherwise. Branch-free, so loops of them vectorize; NaN in gives NaN out. */
RG_INLINE float rg_normal_tail(float x, float *e) {
    float z = fabsf(x) * 0.70710678118654752f, t = 1.0f / (1.0f + 0.3275911f * z);
    float p = 1.061405429f * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    *e = rg_expf(-z * z); /* e^(-x^2/2) */
    return 0.5f * t * p * *e;
}

/* The forward needs no density, so it takes a cheaper form of erfc: Abramowitz and Stegun
 * 7.1.28, erfc(z) = 1 / P(z)^16 with P of degree 6, error below 3e-7 for every z (P^16
 * overflows to infinity where erfc is below float32's smallest, giving 0): no exponential,
 * half the operations of rg_normal_tail. gelu(x) within 8e-7 of the float64 erf form. */
RG_INLINE float rg_gelu(float x) {
    float z = fabsf(x) * 0.70710678118654752f;
    float p = 0.0000430638f * z + 0.0002765672f;
    p = p * z + 0.0001520143f;
    p = p * z + 0.0092705272f;
    p = p * z + 0.0422820123f;
    p = p * z + 0.0705230784f;
    p = p * z + 1.0f;
    p *= p; /* P^2 */
    p *= p; /* P^4 */
    p *= p; /* P^8 */
    p *= p; /* P^16 */
    float q = 0.5f / p; /* Q(|x|) = erfc(z) / 2 */
    return x * rg_select(x < 0.0f, q, 1.0f - q);
}

RG_INLINE float rg_gelu_grad(float x) {
    float e, q = rg_normal_tail(x, &e);
    return rg_select(x < 0.0f, q, 1.0f - q) + x * e * 0.39894228040143268f;
}

/* d[p*w + r] = src[r*ld + p] for p < kc, r < n (n rows of kc floats, at a stride of ld,
 * become kc rows of w >= n floats); zero for n <= r < w when pad. gemm packs op(A) and
 * op(B)^T with it, attention its keys. Whole groups of 4 rows go through 4 x 4 SSE
 * transposes (x86-64 baseline, so every SIMD variant may inline it). */
RG_INLINE void rg_transpose(float *d, const float *src, size_t ld, int n, int w, int kc,
                            int pad) {
    int r0 = 0;
#ifdef RG_X86
    int kc4 = kc & ~3, n4 = n & ~3;
    /* k in chunks of 64, so the chunk of d being filled (64 x w) stays in L1 */
    for (int pb = 0; pb < kc4; pb += 64) {
        int pe = kc4 - pb < 64 ? kc4 : pb + 64;
        for (r0 = 0; r0 < n4; r0 += 4) {
            const float *s0 = src + (size_t)r0 * ld, *s1 = s0 + ld, *s2 = s1 + ld, *s3 = s2 + ld;
            float *dr = d + r0;
            for (int p = pb; p < pe; p += 4) {
                __m128 x0 = _mm_loadu_ps(s0 + p), x1 = _mm_loadu_ps(s1 + p);
                __m128 x2 = _mm_loadu_ps(s2 + p), x3 = _mm_loadu_ps(s3 + p);
                _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
                _mm_storeu_ps(dr + (size_t)p * w, x0);
                _mm_storeu_ps(dr + (size_t)(p + 1) * w, x1);
                _mm_storeu_ps(dr + (size_t)(p + 2) * w, x2);
                _mm_storeu_ps(dr + (size_t)(p + 3) * w, x3);
            }
        }
    }
    for (r0 = 0; r0 < n4; r0++) {
        const float *s_r = src + (size_t)r0 * ld;
        for (int p = kc4; p < kc; p++) d[(size_t)p * w + r0] = s_r[p];
    }
#endif
    for (int r = r0; r < n; r++) {
        const float *s_r = src + (size_t)r * ld;
        for (int p = 0; p < kc; p++) d[(size_t)p * w + r] = s_r[p];
    }
    if (pad && n < w)
        for (int p = 0; p < kc; p++)
            memset(d + (size_t)p * w + n, 0, (size_t)(w - n) * sizeof(float));
}

/* One turn of a spin-wait on another thread's progress. */
static inline void rg_relax(void) {
#ifdef RG_X86
    __builtin_ia32_pause();
#endif
}

#endif /* RUSTGPT_SIMD_H */
