/* The CPU's fp32 arithmetic limit for one thread: independent chains of fused multiply-adds
 * on the widest vectors this build targets (16 floats with AVX-512, 8 with AVX, else 4).
 * benchmarks/study_efficiency.py times it beside torch's matrix product: a BLAS may not use
 * a CPU's widest vectors (on AMD's Zen 5, torch's product reads about 100 GFLOP/s a core,
 * the rate of vectors of 8, while its units run vectors of 16 at about 240), and the study's
 * kernel does; the larger of the two is the peak the study is measured against. */
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
typedef __m512 vf;
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET1(x) _mm512_set1_ps(x)
#define FIRST(v) _mm512_cvtss_f32(v)
#elif defined(__AVX__) && defined(__FMA__)
typedef __m256 vf;
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET1(x) _mm256_set1_ps(x)
#define FIRST(v) _mm256_cvtss_f32(v)
#else
typedef float vf __attribute__((vector_size(16)));
#define FMA(a, b, c) ((a) * (b) + (c))
#define SET1(x) ((vf){x, x, x, x})
#define FIRST(v) ((v)[0])
#endif

/* Floats per vector of sgdn_fma_loop. */
int sgdn_fma_lanes(void) { return (int)(sizeof(vf) / sizeof(float)); }

/* iters x 12 vector multiply-adds (2 x lanes FLOPs each), 12 chains so that the units' latency
 * is hidden; returns a value that depends on every chain, so that none is optimized away. */
float sgdn_fma_loop(int64_t iters) {
    vf b = SET1(1.0000001f), c = SET1(1e-7f);
    vf a0 = SET1(0.f), a1 = SET1(1.f), a2 = SET1(2.f), a3 = SET1(3.f), a4 = SET1(4.f),
       a5 = SET1(5.f), a6 = SET1(6.f), a7 = SET1(7.f), a8 = SET1(8.f), a9 = SET1(9.f),
       a10 = SET1(10.f), a11 = SET1(11.f);
    for (int64_t n = 0; n < iters; n++) {
        a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c); a3 = FMA(a3, b, c);
        a4 = FMA(a4, b, c); a5 = FMA(a5, b, c); a6 = FMA(a6, b, c); a7 = FMA(a7, b, c);
        a8 = FMA(a8, b, c); a9 = FMA(a9, b, c); a10 = FMA(a10, b, c); a11 = FMA(a11, b, c);
    }
    return FIRST(a0) + FIRST(a1) + FIRST(a2) + FIRST(a3) + FIRST(a4) + FIRST(a5) +
           FIRST(a6) + FIRST(a7) + FIRST(a8) + FIRST(a9) + FIRST(a10) + FIRST(a11);
}
