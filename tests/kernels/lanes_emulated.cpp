// lanes.cpp's AVX512 loops on plain C++: each intrinsic they call, lane by lane, so that machines
// without AVX512 (this project's test machine among them) run those loops in the tests
// (tests/kernels/test_lane_tails.py). Bit for bit the instructions' results, but for the order
// of _mm512_reduce_add_ps's sum, which the tests' float32 bound covers. Only for testing: slow.
#include <ATen/Parallel.h>
#include <immintrin.h>  // before the stand-ins: its own names stay its own

#include <cmath>
#include <cstdint>
#include <cstring>

#define BAQ_EMULATED_AVX512 1
#define __m512 baq_m512
#define __m512i baq_m512i

struct baq_m512 {
  float f[16];
};
struct baq_m512i {
  uint32_t u[16];
};

#define BAQ_MAP(expr)                      \
  baq_m512 r;                              \
  for (int l = 0; l < 16; ++l) r.f[l] = expr; \
  return r
#define BAQ_MAPI(expr)                   \
  baq_m512i r;                           \
  for (int l = 0; l < 16; ++l) r.u[l] = expr; \
  return r

static inline baq_m512 baq_set1_ps(float v) { BAQ_MAP(v); }
static inline baq_m512 baq_setzero_ps() { BAQ_MAP(0.0f); }
static inline baq_m512 baq_loadu_ps(const float* p) { BAQ_MAP(p[l]); }
static inline void baq_storeu_ps(float* p, baq_m512 a) { std::memcpy(p, a.f, sizeof a.f); }
static inline baq_m512 baq_add_ps(baq_m512 a, baq_m512 b) { BAQ_MAP(a.f[l] + b.f[l]); }
static inline baq_m512 baq_div_ps(baq_m512 a, baq_m512 b) { BAQ_MAP(a.f[l] / b.f[l]); }
static inline baq_m512 baq_fmadd_ps(baq_m512 a, baq_m512 b, baq_m512 c) {
  BAQ_MAP(std::fma(a.f[l], b.f[l], c.f[l]));
}
static inline baq_m512 baq_fnmadd_ps(baq_m512 a, baq_m512 b, baq_m512 c) {
  BAQ_MAP(std::fma(-a.f[l], b.f[l], c.f[l]));
}
// imm & 3: 0 to nearest (even), 1 down; the only modes lanes.cpp asks for
static inline baq_m512 baq_roundscale_ps(baq_m512 a, int imm) {
  BAQ_MAP((imm & 3) == 1 ? std::floor(a.f[l]) : std::nearbyint(a.f[l]));
}
static inline baq_m512 baq_setr_ps(float a0, float a1, float a2, float a3, float a4, float a5,
                                   float a6, float a7, float a8, float a9, float a10, float a11,
                                   float a12, float a13, float a14, float a15) {
  const float v[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
  return baq_loadu_ps(v);
}
// vpermps: the low 4 bits of each index lane pick the table's lane
static inline baq_m512 baq_permutexvar_ps(baq_m512i idx, baq_m512 t) {
  BAQ_MAP(t.f[idx.u[l] & 15]);
}
static inline baq_m512 baq_cvtepi32_ps(baq_m512i a) { BAQ_MAP((float)(int32_t)a.u[l]); }
static inline float baq_reduce_add_ps(baq_m512 a) {
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += a.f[l];
  return s;
}
static inline baq_m512i baq_set1_epi32(int v) { BAQ_MAPI((uint32_t)v); }
static inline baq_m512i baq_loadu_si512(const void* p) {
  baq_m512i r;
  std::memcpy(r.u, p, sizeof r.u);
  return r;
}
static inline baq_m512i baq_and_si512(baq_m512i a, baq_m512i b) { BAQ_MAPI(a.u[l] & b.u[l]); }
// shifts by 32 or more give 0, as the instructions'
static inline baq_m512i baq_srlv_epi32(baq_m512i a, baq_m512i s) {
  BAQ_MAPI(s.u[l] < 32 ? a.u[l] >> s.u[l] : 0u);
}
static inline baq_m512i baq_srli_epi32(baq_m512i a, unsigned s) {
  BAQ_MAPI(s < 32 ? a.u[l] >> s : 0u);
}

#undef _mm512_set1_ps
#define _mm512_set1_ps baq_set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps baq_setzero_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps baq_loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps baq_storeu_ps
#undef _mm512_add_ps
#define _mm512_add_ps baq_add_ps
#undef _mm512_div_ps
#define _mm512_div_ps baq_div_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps baq_fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps baq_fnmadd_ps
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps baq_roundscale_ps
#undef _mm512_setr_ps
#define _mm512_setr_ps baq_setr_ps
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps baq_permutexvar_ps
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps baq_cvtepi32_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps baq_reduce_add_ps
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 baq_set1_epi32
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 baq_loadu_si512
#undef _mm512_and_si512
#define _mm512_and_si512 baq_and_si512
#undef _mm512_srlv_epi32
#define _mm512_srlv_epi32 baq_srlv_epi32
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 baq_srli_epi32

#include "../../src/baq/kernels/lanes.cpp"
