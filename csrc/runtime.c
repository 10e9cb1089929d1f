/* runtime.c: thread count and SIMD level, the two switches every parallel kernel reads. */
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int simd_level = -1; /* -1: not chosen yet */

int rg_simd_supported(void) {
#ifdef RG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
        return RG_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return RG_SIMD_AVX2;
#endif
    return RG_SIMD_GENERIC;
}

int rg_simd_level(void) {
    if (simd_level < 0) simd_level = rg_simd_supported();
    return simd_level;
}

int rg_set_simd_level(int level) {
    int best = rg_simd_supported();
    if (level < RG_SIMD_GENERIC) level = RG_SIMD_GENERIC;
    simd_level = level > best ? best : level;
    return simd_level;
}

int rg_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The process-wide count (0: OpenMP's default, OMP_NUM_THREADS or the CPUs) and this
 * thread's override of it (0: none). Every parallel region passes rg_num_threads() as its
 * num_threads: omp_set_num_threads would set only the calling thread's count. */
static int threads_all = 0;
static _Thread_local int threads_here = 0;

int rg_num_threads(void) {
#ifdef _OPENMP
    if (threads_here > 0) return threads_here;
    int n = __atomic_load_n(&threads_all, __ATOMIC_RELAXED);
    return n > 0 ? n : omp_get_max_threads();
#else
    return 1;
#endif
}

void rg_set_num_threads(int n) {
    __atomic_store_n(&threads_all, n > 0 ? n : 0, __ATOMIC_RELAXED);
}

int rg_set_local_threads(int n) {
    int before = threads_here;
    threads_here = n > 0 ? n : 0;
    return before;
}

void rg_run_streams(int n, const unsigned char *stream, const int *wait,
                    void (*run)(void *ctx, int j), void *ctx) {
    int nt = rg_num_threads();
    if (nt < 2) {
        for (int j = 0; j < n; j++) run(ctx, j);
        return;
    }
    int done[2] = {-1, -1}; /* the latest call each stream finished (atomic) */
    #pragma omp parallel num_threads(2)
    {
#ifdef _OPENMP
        int s = omp_get_thread_num(), team = omp_get_num_threads();
#else
        int s = 0, team = 1;
#endif
        int before = rg_set_local_threads(1);
        for (int j = 0; j < n; j++) {
            if (team < 2) { /* given one thread (nested, OMP_THREAD_LIMIT): all in order */
                run(ctx, j);
                continue;
            }
            if (stream[j] != s) continue;
            while (__atomic_load_n(&done[1 - s], __ATOMIC_ACQUIRE) < wait[j]) rg_relax();
            run(ctx, j);
            __atomic_store_n(&done[s], j, __ATOMIC_RELEASE);
        }
        rg_set_local_threads(before);
    }
}
