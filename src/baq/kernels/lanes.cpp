// The lane-field kernel of baq/kernels/native.py (issue 26): y = x W^T + b for a packed layer in
// the layout of baq/kernels/lanes.py, without building W. Plain C ABI (called through ctypes);
// at::parallel_for runs the rows on torch's own OpenMP pool, so torch.set_num_threads applies and
// no second pool competes with torch's.
//
// Layout (lanes.py): the columns with L > 1, sorted by (column group, L), sit in "slots"; every
// column group starts on a chunk of 16 slots (padding slots: no column, input 0). Chunk k of
// width w is a w-bit field at bit shift[k] of the 16 uint32 lanes of the block at word word[k]
// of a row, slot l in lane l. Runs are consecutive chunks of one width. The fields of the last
// bit-field block of a row (the "tail" chunks: k >= ktail, bit fields) may instead sit in one or
// two tail parts, a part of b <= 16 bits shared by P = 32 / b rows: row r's at bit (r % P) * b +
// shift[k] of the lanes of tail block first + r / P (word[k] = 16 * part). The row's own blocks
// keep one stride, rowwords, so rows i < NR of a register block sit at row + i * rowwords, and
// only the tail chunks take a pointer and an offset per row and part. The product (module
// docstring of native.py):
//   per OC  y[r] = sum_g span[r,g] * (sum_s xs[s] q[r,s] - sum_{c in g} z(r,c) X[c])
//   per IC  y[r] = sum_s xs_gr[s] q[r,s] - zterm[gr]
// with xs[s] = x[col s] / (L_s - 1) (per IC x * step[gr, col]), X[c] the sum of xs over class c.
// A chunk's 16 codes come back as float32 exactly (a shift, then a 16-entry vpermps table or a
// mask and a conversion; in a radix run, a digit peeled off a 21- or 11-bit base-B word in
// float32, exact for words under 2^21: lanes.py) and are multiplied into one accumulator per
// token: no rounding but the float32 sums, which the tests bound against the dequantized
// float64 product.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__F16C__) && !defined(BAQ_PORTABLE)
#include <immintrin.h>  // _mm256_cvtph_ps (the ranges of float16 layers)
#endif

#if defined(BAQ_EMULATED_AVX512)
// the AVX512 loops on plain C++ stand-ins for the intrinsics, defined by the file including this
// one (tests/kernels/lanes_emulated.cpp): machines without AVX512 test them too
#define BAQ_AVX512 1
#elif defined(__AVX512F__) && !defined(BAQ_PORTABLE)
#include <immintrin.h>
#define BAQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(BAQ_PORTABLE)
// AVX2 (most x86 CPUs without AVX512): the same 16-lane loops, each 512-bit vector a pair of
// 256-bit ones. The portable loops, which gcc leaves mostly scalar, ran 4.6x slower than float32
// F.linear on 4096x14336 and 4x slower than the "codes" path on 576x1536 (one thread, session 18)
#include <immintrin.h>
#define BAQ_AVX512 1
#define BAQ_AVX2_PAIRS 1
#define __m512 baq_m512
#define __m512i baq_m512i
struct baq_m512 {
  __m256 a, b;
};
struct baq_m512i {
  __m256i a, b;
};
static inline baq_m512 baq_set1_ps(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
static inline baq_m512 baq_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline baq_m512 baq_loadu_ps(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
static inline void baq_storeu_ps(float* p, baq_m512 v) {
  _mm256_storeu_ps(p, v.a);
  _mm256_storeu_ps(p + 8, v.b);
}
static inline baq_m512 baq_add_ps(baq_m512 x, baq_m512 y) {
  return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)};
}
static inline baq_m512 baq_div_ps(baq_m512 x, baq_m512 y) {
  return {_mm256_div_ps(x.a, y.a), _mm256_div_ps(x.b, y.b)};
}
static inline baq_m512 baq_fmadd_ps(baq_m512 x, baq_m512 y, baq_m512 z) {
  return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
}
static inline baq_m512 baq_fnmadd_ps(baq_m512 x, baq_m512 y, baq_m512 z) {
  return {_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b)};
}
// the rounding modes lanes.cpp asks for (to nearest, down) are vroundps's immediates as well
template <int IMM>
static inline baq_m512 baq_roundscale_ps(baq_m512 x) {
  return {_mm256_round_ps(x.a, IMM), _mm256_round_ps(x.b, IMM)};
}
static inline baq_m512 baq_setr_ps(float a0, float a1, float a2, float a3, float a4, float a5,
                                   float a6, float a7, float a8, float a9, float a10, float a11,
                                   float a12, float a13, float a14, float a15) {
  return {_mm256_setr_ps(a0, a1, a2, a3, a4, a5, a6, a7),
          _mm256_setr_ps(a8, a9, a10, a11, a12, a13, a14, a15)};
}
// vpermps of 16 entries: the low 3 bits pick within each half of the table, bit 3 the half
static inline __m256 baq_permute16(__m256i idx, baq_m512 t) {
  const __m256 lo = _mm256_permutevar8x32_ps(t.a, idx), hi = _mm256_permutevar8x32_ps(t.b, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
static inline baq_m512 baq_permutexvar_ps(baq_m512i idx, baq_m512 t) {
  return {baq_permute16(idx.a, t), baq_permute16(idx.b, t)};
}
static inline baq_m512 baq_cvtepi32_ps(baq_m512i x) {
  return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)};
}
static inline float baq_reduce_add_ps(baq_m512 x) {
  const __m256 s = _mm256_add_ps(x.a, x.b);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
static inline baq_m512i baq_set1_epi32(int v) {
  return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)};
}
static inline baq_m512i baq_loadu_si512(const void* p) {
  const __m256i* q = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
static inline baq_m512i baq_and_si512(baq_m512i x, baq_m512i y) {
  return {_mm256_and_si256(x.a, y.a), _mm256_and_si256(x.b, y.b)};
}
// shifts by 32 or more give 0, as AVX512's
static inline baq_m512i baq_srlv_epi32(baq_m512i x, baq_m512i n) {
  return {_mm256_srlv_epi32(x.a, n.a), _mm256_srlv_epi32(x.b, n.b)};
}
static inline baq_m512i baq_srli_epi32(baq_m512i x, int n) {
  return {_mm256_srli_epi32(x.a, n), _mm256_srli_epi32(x.b, n)};
}
#define _mm512_set1_ps baq_set1_ps
#define _mm512_setzero_ps baq_setzero_ps
#define _mm512_loadu_ps baq_loadu_ps
#define _mm512_storeu_ps baq_storeu_ps
#define _mm512_add_ps baq_add_ps
#define _mm512_div_ps baq_div_ps
#define _mm512_fmadd_ps baq_fmadd_ps
#define _mm512_fnmadd_ps baq_fnmadd_ps
#define _mm512_roundscale_ps(x, imm) baq_roundscale_ps<(imm)>(x)
#define _mm512_setr_ps baq_setr_ps
#define _mm512_permutexvar_ps baq_permutexvar_ps
#define _mm512_cvtepi32_ps baq_cvtepi32_ps
#define _mm512_reduce_add_ps baq_reduce_add_ps
#define _mm512_set1_epi32 baq_set1_epi32
#define _mm512_loadu_si512 baq_loadu_si512
#define _mm512_and_si512 baq_and_si512
#define _mm512_srlv_epi32 baq_srlv_epi32
#define _mm512_srli_epi32 baq_srli_epi32
#else
#define BAQ_AVX512 0
#endif

namespace {

constexpr int CHUNK = 16;  // slots per chunk: one 512-bit vector of float32
// tokens multiplied together (accumulators kept in registers; AVX2 has half the registers for
// twice as many halves: 4, see group_dots)
#ifdef BAQ_AVX2_PAIRS
constexpr int TMAX = 4;
#else
constexpr int TMAX = 8;
#endif

struct Layout {
  const uint32_t* words;       // (rows, rowwords): each row's own blocks
  const int32_t* chunk_word;   // (nchunks): first word of the chunk's block in a row
  const int32_t* chunk_shift;  // (nchunks): bit of the chunk's field in its lanes
  const int32_t* runs;         // (nruns, 4): first chunk, end chunk, width, base (0: bits)
  const int32_t* grun;         // (ngc + 1): first run of each column group
  const int32_t* slot_col;     // (nslots): original column, -1 for padding
  const float* slot_lm1;       // (nslots): L - 1 in float32 (1 for padding)
  const int32_t* classes;      // (K, 4): column group, L, first slot, end slot
  const int32_t* gclass;       // (ngc + 1): first class of each column group
  int64_t rows, cols, rowwords, nslots, ngc, K;
  int64_t ic, sym, rsize, nrg;  // per IC: row group size (0: one group) and count
  // the shared tails last: a kernel built before them reads this struct's prefix, so it runs
  // a layout without tails unchanged (benchmarks/kernel_ab.py --baseline-source)
  const uint32_t* tail;       // (ntail, 16): the shared tail blocks of every part
  const int32_t* tail_parts;  // (nparts, 3): rows a block P, bits b, first block
  int64_t ktail, nparts;      // first tail chunk (nchunks: none), tail parts (0 to 2)
};

constexpr int MAX_PARTS = 2;  // lanes.py _tail_parts

// where rows r..r + NR - 1 read their tail chunks: of each part, the shared block and the bit
// offset of every row
template <int NR>
struct Tails {
  const uint32_t* blk[MAX_PARTS][NR] = {};
  int off[MAX_PARTS][NR] = {};
  Tails(const Layout& L, int64_t r) {
    for (int p = 0; p < L.nparts; ++p) {
      const int32_t P = L.tail_parts[3 * p], b = L.tail_parts[3 * p + 1];
      for (int i = 0; i < NR; ++i) {
        blk[p][i] = L.tail + (L.tail_parts[3 * p + 2] + (r + i) / P) * CHUNK;
        off[p][i] = (int)((r + i) % P) * b;
      }
    }
  }
  // the lanes holding row i's field of tail chunk k, and the bit where it starts
  const uint32_t* lanes(const Layout& L, int64_t k, int i) const {
    return blk[L.chunk_word[k] / CHUNK][i];
  }
  int shift(const Layout& L, int64_t k, int i) const {
    return L.chunk_shift[k] + off[L.chunk_word[k] / CHUNK][i];
  }
};

// whether chunk k of a bit-field run is a tail chunk (radix chunks never are)
inline bool in_tail(const Layout& L, int64_t k) { return k >= L.ktail; }

// the zero point of quant/grid.py column_params, float32 as there (no fast-math in this file);
// rint, not nearbyint: the same rounding (half to even), but gcc inlines and vectorises rint
// where nearbyint stayed a library call per class and row
inline float zero_point(float lo, float span, float lm1, int64_t sym) {
  if (sym) return std::floor((lm1 + 1.0f) * 0.5f);
  return std::rint(-lo / (span / lm1));
}

// z[c] = zero_point(lo, span, lm1[c], asymmetric) for c in [c0, c1): two float32 divisions and a
// rounding per class, 16 classes a vector (gcc left this loop scalar); bit for bit the scalar
inline void zero_points(float lo, float span, const float* lm1, float* z, int64_t c0, int64_t c1) {
  int64_t c = c0;
#if BAQ_AVX512
  const __m512 vspan = _mm512_set1_ps(span), vneg = _mm512_set1_ps(-lo);
  for (; c + 16 <= c1; c += 16) {
    const __m512 step = _mm512_div_ps(vspan, _mm512_loadu_ps(lm1 + c));
    const __m512 q = _mm512_div_ps(vneg, step);
    _mm512_storeu_ps(z + c, _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; c < c1; ++c) z[c] = std::rint(-lo / (span / lm1[c]));
}

constexpr int RADIX_LO_BITS = 21;  // lanes.py: the low word of a radix lane
constexpr uint32_t RADIX_LO_MASK = (1u << RADIX_LO_BITS) - 1;

// base-b digits that fit a word of ``bits`` bits (b^d <= 2^bits), as lanes.py radix_digits
inline int radix_digits(int b, int bits) {
  int d = 0;
  for (int64_t p = b; p <= (int64_t(1) << bits); p *= b) ++d;
  return d;
}

// the code of chunk k in lane value v, scalar (the portable build and the dequantization):
// a bit field, or digit ``shift`` of a radix block of base ``base``
struct FieldReader {
  uint32_t mask, div, base, shift;
  FieldReader(int width, int base_, int shift_) {
    if (base_ == 0) {
      mask = (1u << width) - 1, div = 1, base = 0, shift = (uint32_t)shift_;
      return;
    }
    const int dlo = radix_digits(base_, RADIX_LO_BITS);
    const bool hi = shift_ >= dlo;
    shift = hi ? RADIX_LO_BITS : 0;
    mask = hi ? ~0u >> RADIX_LO_BITS : RADIX_LO_MASK;
    div = 1;
    for (int p = hi ? shift_ - dlo : shift_; p > 0; --p) div *= (uint32_t)base_;
    base = (uint32_t)base_;
  }
  uint32_t operator()(uint32_t v) const {
    const uint32_t f = (v >> shift) & mask;
    return base ? (f / div) % base : f;
  }
};

#if BAQ_AVX512
#ifdef BAQ_AVX2_PAIRS
constexpr bool AVX2_PAIRS = true;
#else
constexpr bool AVX2_PAIRS = false;
#endif

// 16 codes as float32 from lanes already shifted: for w <= 4 vpermps reads the low 4 bits of
// each lane from the table i & (2^w - 1), which drops the bits of the fields above; on AVX2,
// where a 16-entry vpermps takes two permutes and a blend a half, a mask and a conversion
template <int W>
inline __m512 codes_of(__m512i v) {
  if constexpr (W <= 4 && !AVX2_PAIRS) {
    constexpr int m = (1 << W) - 1;
    const __m512 table = _mm512_setr_ps(0 & m, 1 & m, 2 & m, 3 & m, 4 & m, 5 & m, 6 & m, 7 & m,
                                        8 & m, 9 & m, 10 & m, 11 & m, 12 & m, 13 & m, 14 & m,
                                        15 & m);
    return _mm512_permutexvar_ps(v, table);
  } else {
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((1 << W) - 1)));
  }
}

// one chunk through the tables (block, shift): the chunks sharing a block with another run
template <int W, int NR, int TT, int U>
inline void one_chunk(const Layout& L, const uint32_t* row, const float* xs, int64_t ts,
                      int64_t k, __m512 (&acc)[NR][TT][U]) {
  const __m512i sh = _mm512_set1_epi32(L.chunk_shift[k]);
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i) {
    const __m512i v = _mm512_loadu_si512(row + i * L.rowwords + L.chunk_word[k]);
    const __m512 q = codes_of<W>(_mm512_srlv_epi32(v, sh));
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
      acc[i][t][0] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xs + t * ts + k * CHUNK), acc[i][t][0]);
  }
}

// a tail chunk: each row's shared block and shift (a shift past the row's field drops the
// fields of the rows below; the table or the mask drops those above)
template <int W, int NR, int TT, int U>
inline void tail_chunk(const Layout& L, const Tails<NR>& tails, const float* xs, int64_t ts,
                       int64_t k, __m512 (&acc)[NR][TT][U]) {
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i) {
    const __m512i v = _mm512_loadu_si512(tails.lanes(L, k, i));
    const __m512 q = codes_of<W>(_mm512_srlv_epi32(v, _mm512_set1_epi32(tails.shift(L, k, i))));
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
      acc[i][t][0] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xs + t * ts + k * CHUNK), acc[i][t][0]);
  }
}

// a chunk outside the whole blocks: the row's own (one_chunk, as before tails) or a tail chunk
template <int W, int NR, int TT, int U>
inline void table_chunk(const Layout& L, const uint32_t* row, const Tails<NR>& tails,
                        const float* xs, int64_t ts, int64_t k, __m512 (&acc)[NR][TT][U]) {
  if (in_tail(L, k))
    tail_chunk<W, NR, TT, U>(L, tails, xs, ts, k, acc);
  else
    one_chunk<W, NR, TT, U>(L, row, xs, ts, k, acc);
}

// acc[i][t][.] += codes of row i of the chunks [k0, k1) of width W times xs of token t. Inside
// a run the chunks fill whole blocks, F = 32 / W fields at shifts 0, W, 2W...: one load a block
// and shifts by immediates; only the chunks before the first whole block (in the block the run
// shares with the one before) and after the last, the tail chunks among them, go through the
// tables. NR rows share each load of xs: one row at a time read the whole scaled input (57 KB at
// 14336 columns, more than L1) from L2 once per row
template <int W, int NR, int TT, int U>
inline void run_chunks(const Layout& L, const uint32_t* row, const Tails<NR>& tails,
                       const float* xs, int64_t ts, int64_t k0, int64_t k1,
                       __m512 (&acc)[NR][TT][U]) {
  constexpr int F = 32 / W;
  // whole blocks are a row's own (the chunks from ktail on are in the tail parts)
  const int64_t kown = std::min<int64_t>(k1, L.ktail);
  int64_t k = k0;
  for (; k < k1 && L.chunk_shift[k] != 0; ++k)
    table_chunk<W, NR, TT, U>(L, row, tails, xs, ts, k, acc);
  if (k + F <= kown) {
    const uint32_t* blk = row + L.chunk_word[k];
    for (; k + F <= kown; k += F, blk += CHUNK) {
      __m512i v[NR];
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) v[i] = _mm512_loadu_si512(blk + i * L.rowwords);
      const float* x = xs + k * CHUNK;
#pragma GCC unroll 32
      for (int f = 0; f < F; ++f) {
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) {
          const __m512 xv = _mm512_loadu_ps(x + t * ts + f * CHUNK);
#pragma GCC unroll 4
          for (int i = 0; i < NR; ++i) {
            const __m512 q = codes_of<W>(f == 0 ? v[i] : _mm512_srli_epi32(v[i], f * W));
            acc[i][t][f % U] = _mm512_fmadd_ps(q, xv, acc[i][t][f % U]);
          }
        }
      }
    }
  }
  for (; k < k1; ++k) table_chunk<W, NR, TT, U>(L, row, tails, xs, ts, k, acc);
}

// acc[i][t][.] += codes of row i of the radix chunks [k0, k1) of base B times xs of token t: a
// block holds dlo digits in the low 21 bits of its lanes and dhi in the high 11, digit p being
// chunk k0 + p. Each word goes to float32 once; its quotients q_p = floor((f + 1/2) / B^p) are
// exact (lanes.py) and independent of each other, so no chain of divisions waits on the one
// before; digit p is q_p - B q_{p+1} (exact: integers under 2^21)
template <int NR, int TT, int U>
inline void radix_chunks(const Layout& L, const uint32_t* row, const float* xs, int64_t ts,
                         int64_t k0, int64_t k1, int B, __m512 (&acc)[NR][TT][U]) {
  const int dlo = radix_digits(B, RADIX_LO_BITS), D = dlo + radix_digits(B, 32 - RADIX_LO_BITS);
  float inv[32], half[32];  // 1 / B^p and 1 / (2 B^p) of each digit in its word
  for (int p = 0, q = 0; p < D; ++p, ++q) {
    if (p == dlo) q = 0;
    double pw = 1.0;
    for (int e = 0; e < q; ++e) pw *= B;
    inv[p] = (float)(1.0 / pw), half[p] = (float)(0.5 / pw);
  }
  const __m512 vb = _mm512_set1_ps((float)B);
  const __m512i vmask = _mm512_set1_epi32((int)RADIX_LO_MASK);
  for (int64_t k = k0; k < k1; k += D) {
    const uint32_t* blk = row + L.chunk_word[k];
    const int nd = (int)std::min<int64_t>(D, k1 - k);
    __m512 flo[NR], fhi[NR];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      const __m512i v = _mm512_loadu_si512(blk + i * L.rowwords);
      flo[i] = _mm512_cvtepi32_ps(_mm512_and_si512(v, vmask));
      fhi[i] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, RADIX_LO_BITS));
    }
    const float* x = xs + k * CHUNK;
    __m512 cur[NR];  // q_p of each row
    for (int i = 0; i < NR; ++i) cur[i] = flo[i];
    for (int p = 0; p < nd; ++p) {
      const bool top = p == dlo - 1 || p == D - 1;  // the word's last digit is its quotient
      __m512 q[NR];
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        if (top) {
          q[i] = cur[i];
          cur[i] = fhi[i];  // q_0 of the high word
        } else {
          const __m512 f = p < dlo ? flo[i] : fhi[i];
          const __m512 next = _mm512_roundscale_ps(
              _mm512_fmadd_ps(f, _mm512_set1_ps(inv[p + 1]), _mm512_set1_ps(half[p + 1])),
              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          q[i] = _mm512_fnmadd_ps(next, vb, cur[i]);
          cur[i] = next;
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const __m512 xv = _mm512_loadu_ps(x + t * ts + p * CHUNK);
#pragma GCC unroll 4
        for (int i = 0; i < NR; ++i) acc[i][t][p % U] = _mm512_fmadd_ps(q[i], xv, acc[i][t][p % U]);
      }
    }
  }
}

// dot[i * TT + t] = sum over the runs [r0, r1) of row row0 + i of xs[t] . codes, rows i < NR at
// ``row + i * rowwords`` and their tails; each row's sum in the order of one row alone (bit for
// bit)
template <int NR, int TT>
void group_dots(const Layout& L, int64_t row0, const float* xs, int64_t ts, int r0, int r1,
                float* dot) {
  const uint32_t* row = L.words + row0 * L.rowwords;
  const Tails<NR> tails(L, row0);
  // independent FMA chains per token; AVX2 one: a 512-bit accumulator takes two of its 16
  // registers, and 4 chains of 4 rows spilled to the stack (one chain of 2 rows: 1.20x faster on
  // 4096x14336 at one token, 1.47x on 576x1536, 1.32x on 1536x576, one thread, session 20;
  // rows_together)
  constexpr int U = AVX2_PAIRS ? 1 : (TT == 1 ? 4 : (TT == 2 ? 2 : 1));
  __m512 acc[NR][TT][U];
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < TT; ++t)
      for (int u = 0; u < U; ++u) acc[i][t][u] = _mm512_setzero_ps();
  for (int r = r0; r < r1; ++r) {
    const int32_t* run = L.runs + 4 * r;
    if (run[3] != 0) {
      radix_chunks<NR, TT, U>(L, row, xs, ts, run[0], run[1], run[3], acc);
      continue;
    }
    switch (run[2]) {
      case 1: run_chunks<1, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      case 2: run_chunks<2, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      case 3: run_chunks<3, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      case 4: run_chunks<4, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      case 5: run_chunks<5, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      case 6: run_chunks<6, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      case 7: run_chunks<7, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
      default: run_chunks<8, NR, TT, U>(L, row, tails, xs, ts, run[0], run[1], acc); break;
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < TT; ++t) {
      __m512 s = acc[i][t][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[i][t][u]);
      dot[i * TT + t] = _mm512_reduce_add_ps(s);
    }
}
#else
// portable: plain loops over the 16 lanes of a chunk, which the compiler vectorises for the
// host (AVX2: 8 lanes; without vector units, scalar)
template <int NR, int TT>
void group_dots(const Layout& L, int64_t row0, const float* xs, int64_t ts, int r0, int r1,
                float* dot) {
  const Tails<NR> tails(L, row0);
  for (int i = 0; i < NR; ++i) {
    const uint32_t* row = L.words + (row0 + i) * L.rowwords;
    float acc[TT][CHUNK] = {};
    for (int r = r0; r < r1; ++r) {
      const int32_t* run = L.runs + 4 * r;
      for (int64_t k = run[0]; k < run[1]; ++k) {
        const bool tail = run[3] == 0 && in_tail(L, k);
        const uint32_t* v = tail ? tails.lanes(L, k, i) : row + L.chunk_word[k];
        const FieldReader read(run[2], run[3], tail ? tails.shift(L, k, i) : L.chunk_shift[k]);
        float q[CHUNK];
        for (int l = 0; l < CHUNK; ++l) q[l] = (float)read(v[l]);
        const float* x = xs + k * CHUNK;
        for (int t = 0; t < TT; ++t)
          for (int l = 0; l < CHUNK; ++l) acc[t][l] += q[l] * x[t * ts + l];
      }
    }
    for (int t = 0; t < TT; ++t) {
      float s = 0.0f;
      for (int l = 0; l < CHUNK; ++l) s += acc[t][l];
      dot[i * TT + t] = s;
    }
  }
}
#endif

// rows sharing one pass over the scaled input at tt tokens: 4 at one token, 2 up to 4 tokens
// (the accumulators, NR * tt * U <= 16, stay in registers). AVX2: 2 rows up to 2 tokens, then
// one (NR * tt <= 4 pairs of registers; 4 tokens a pass: against 8 tokens and 2 rows, 1.33x
// faster at 4 tokens and 1.21x at 16 on 4096x14336, two threads, session 20)
#ifdef BAQ_AVX2_PAIRS
inline int rows_together(int tt) { return tt <= 2 ? 2 : 1; }
#else
inline int rows_together(int tt) { return tt == 1 ? 4 : (tt <= 4 ? 2 : 1); }
#endif

void dots(int nr, int tt, const Layout& L, int64_t row, const float* xs, int64_t ts,
          int r0, int r1, float* dot) {
  if (nr == 4) {
    group_dots<4, 1>(L, row, xs, ts, r0, r1, dot);
    return;
  }
  if (nr == 2) {
    switch (tt) {
      case 1: group_dots<2, 1>(L, row, xs, ts, r0, r1, dot); break;
      case 2: group_dots<2, 2>(L, row, xs, ts, r0, r1, dot); break;
      case 3: group_dots<2, 3>(L, row, xs, ts, r0, r1, dot); break;
      default: group_dots<2, 4>(L, row, xs, ts, r0, r1, dot); break;
    }
    return;
  }
  switch (tt) {
    case 1: group_dots<1, 1>(L, row, xs, ts, r0, r1, dot); break;
    case 2: group_dots<1, 2>(L, row, xs, ts, r0, r1, dot); break;
    case 3: group_dots<1, 3>(L, row, xs, ts, r0, r1, dot); break;
    case 4: group_dots<1, 4>(L, row, xs, ts, r0, r1, dot); break;
    case 5: group_dots<1, 5>(L, row, xs, ts, r0, r1, dot); break;
    case 6: group_dots<1, 6>(L, row, xs, ts, r0, r1, dot); break;
    case 7: group_dots<1, 7>(L, row, xs, ts, r0, r1, dot); break;
    default: group_dots<1, 8>(L, row, xs, ts, r0, r1, dot); break;
  }
}

struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(size_t n) {
    if (posix_memalign((void**)&p, 64, n * sizeof(float) + 64) != 0) p = nullptr;
    if (p) std::memset(p, 0, n * sizeof(float));
  }
  ~AlignedFloats() { std::free(p); }
};

// ---------------------------------------------------------------------------------------------
// Row lanes (baq/kernels/row_lanes.py, the layout of cache="kernel"): the 16 lanes of a block
// are 16 rows, a lane word holds one row's codes as segments of d base-B digits (value
// sum_i q_i B^i at bit ``shift`` of word ``word``: under 2^21 for radix digits, any width for
// bit fields, B a power of two), the same place in every row. A block's product walks the
// segments in slot order: one load, shift, mask and conversion a segment, then per digit its
// quotient q_p = floor((f + 1/2) / B^p) (exact, lanes.py) and q_p - B q_{p+1} (a bit field: a
// shift, a mask, a conversion), and one FMA a token into the block's 16 rows. No horizontal
// sums; the tuning macros (BAQ_ROWS_*) exist for A/B builds of compile-time variants.

struct RowLayout {
  const uint32_t* words;   // (nblocks, nwords, 16): lane l of block b is row 16 b + l
  const int16_t* segs;     // (nseg, 4): word, base, shift, digits, in slot order
  const int32_t* gseg;     // (ngc + 1): first segment of each column group
  const void* slot_col;    // (nslots): original column, int16 (col16) or int32
  const int32_t* classes;  // (K, 4): column group, L, first slot, end slot
  const int32_t* gclass;   // (ngc + 1): first class of each column group
  int64_t rows, cols, nwords, nslots, nseg, ngc, K, ic, sym, rsize, nrg, col16;
};

constexpr int ROW_LANES = 16;
constexpr int MAX_DIGITS = 32;  // 1-bit fields in a word (radix digits: 21 at most, base 2)
constexpr int MAX_ROW_LEVELS = 256;

inline int64_t slot_column(const RowLayout& L, int64_t s) {
  return L.col16 ? (int64_t) static_cast<const int16_t*>(L.slot_col)[s]
                 : (int64_t) static_cast<const int32_t*>(L.slot_col)[s];
}

// the decoding constants of one base, made once a call: the mask of a segment of d digits, and
// 1 / B^p and 1 / (2 B^p) (computed in double, rounded once)
struct BaseConsts {
  float base;
  int width;  // log2 B for a power of two: its digits are bit fields; else 0
  uint32_t mask[MAX_DIGITS + 1];
  float inv[MAX_DIGITS + 1], half[MAX_DIGITS + 1];
};

// one segment in 8 bytes: a block's product reads the whole list (3426 segments on a
// 14336-column row; 32-byte entries took 110 KB beside the block's codes and inputs)
struct Segment {
  int32_t lane;  // its word's first lane in a block: word * 16
  uint8_t shift, digits;
  uint16_t base;  // its BaseConsts
};

// runs of consecutive segments of one digit count inside one column group: the kernel's loop
// over a run is unrolled for its count (a count changing every few segments, in a loop whose
// trip count changed with it, mispredicted a branch a segment: 1.9x slower at one token)
struct SegmentRun {
  int64_t k0, k1, first;  // first: the first slot of segment k0
  int digits;
  bool fields;  // bit fields (a power-of-two base): up to 32 digits
};

struct Segments {
  int64_t ahead = 0;  // words a block: its next block's lanes are this far on
  std::vector<Segment> seg;
  std::vector<BaseConsts> bases;
  std::vector<SegmentRun> runs;
  std::vector<int64_t> group_run;  // (ngc + 1): first run of each column group
};

inline Segments segments_of(const RowLayout& L) {
  Segments out;
  out.ahead = L.nwords * ROW_LANES;
  out.seg.resize((size_t)L.nseg);
  std::vector<int> at(MAX_ROW_LEVELS + 1, -1);
  for (int64_t k = 0; k < L.nseg; ++k) {
    const int16_t* s = L.segs + 4 * k;
    const int B = s[1];
    if (at[B] < 0) {
      at[B] = (int)out.bases.size();
      BaseConsts c{};
      c.base = (float)B;
      c.width = (B & (B - 1)) == 0 ? __builtin_ctz((unsigned)B) : 0;
      double pw = 1.0;
      uint64_t top = 1;  // B^p while under 2^32 (segments hold under 2^21)
      for (int p = 0; p <= MAX_DIGITS; ++p, pw *= B) {
        c.inv[p] = (float)(1.0 / pw), c.half[p] = (float)(0.5 / pw);
        // the bits of values under B^p: the bit length of B^p - 1
        c.mask[p] = top > (uint64_t(1) << 32) ? ~0u
                    : top == 1                ? 0u
                                              : (uint32_t)((~uint64_t(0)) >> __builtin_clzll(top - 1));
        if (top <= (uint64_t(1) << 32)) top *= (uint64_t)B;
      }
      out.bases.push_back(c);
    }
    out.seg[(size_t)k] = {s[0] * ROW_LANES, (uint8_t)s[2], (uint8_t)s[3], (uint16_t)at[B]};
  }
  out.group_run.assign((size_t)L.ngc + 1, 0);
  int64_t first = 0;
  for (int64_t g = 0; g < L.ngc; ++g) {
    out.group_run[g] = (int64_t)out.runs.size();
    for (int64_t k = L.gseg[g]; k < L.gseg[g + 1]; ++k) {
      const int d = out.seg[(size_t)k].digits;
      const bool fields = out.bases[out.seg[(size_t)k].base].width > 0;
      if (out.runs.size() > (size_t)out.group_run[g] && out.runs.back().digits == d &&
          out.runs.back().fields == fields)
        ++out.runs.back().k1;
      else
        out.runs.push_back({k, k + 1, first, d, fields});
      first += d;
    }
  }
  out.group_run[L.ngc] = (int64_t)out.runs.size();
  return out;
}

#if BAQ_AVX512
// acc[b][t][.] += the codes of the segments of ``run`` (each of D digits) of the 16 rows of
// block b (at ``blk + b * S.ahead``) times xs of token t: NB blocks share each segment's
// constants and each input's broadcast
template <int D, int NB, int TT, int U>
inline void row_run(const Segments& S, const SegmentRun& run, const uint32_t* blk,
                    const float* xs, int64_t ts, __m512 (&acc)[NB][TT][U]) {
  const float* x = xs + run.first;
  for (int64_t k = run.k0; k < run.k1; ++k, x += D) {
    const Segment s = S.seg[(size_t)k];
    const BaseConsts& c = S.bases[s.base];
    const __m512i sh = _mm512_set1_epi32(s.shift), mask = _mm512_set1_epi32((int)c.mask[D]);
    __m512 f[NB], cur[NB];
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) {
      const uint32_t* lanes = blk + b * S.ahead + s.lane;
      __builtin_prefetch(lanes + NB * S.ahead, 0, 2);  // the next pass's word, into L2
      f[b] = _mm512_cvtepi32_ps(_mm512_and_si512(
          _mm512_srlv_epi32(_mm512_loadu_si512(lanes), sh), mask));
      cur[b] = f[b];
    }
    const __m512 vb = _mm512_set1_ps(c.base);
#pragma GCC unroll 21
    for (int p = 0; p < D; ++p) {
      __m512 d[NB];
#pragma GCC unroll 2
      for (int b = 0; b < NB; ++b) {
        d[b] = cur[b];
        if (p + 1 < D) {
          const __m512 next = _mm512_roundscale_ps(
              _mm512_fmadd_ps(f[b], _mm512_set1_ps(c.inv[p + 1]), _mm512_set1_ps(c.half[p + 1])),
              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          d[b] = _mm512_fnmadd_ps(next, vb, cur[b]);
          cur[b] = next;
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const __m512 xv = _mm512_set1_ps(x[t * ts + p]);
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b)
          acc[b][t][p % U] = _mm512_fmadd_ps(d[b], xv, acc[b][t][p % U]);
      }
    }
  }
}

// the same for segments of D bit fields of the base's width: a shift, a mask and a conversion a
// code, none on the multiply units (which the radix digits' peeling loads)
template <int D, int NB, int TT, int U>
inline void field_run(const Segments& S, const SegmentRun& run, const uint32_t* blk,
                      const float* xs, int64_t ts, __m512 (&acc)[NB][TT][U]) {
  const float* x = xs + run.first;
  for (int64_t k = run.k0; k < run.k1; ++k, x += D) {
    const Segment s = S.seg[(size_t)k];
    const int w = S.bases[s.base].width;
    const __m512i mask = _mm512_set1_epi32((int)((1u << w) - 1)), step = _mm512_set1_epi32(w);
    const __m512i sh = _mm512_set1_epi32(s.shift);
    __m512i v[NB];
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) {
      const uint32_t* lanes = blk + b * S.ahead + s.lane;
      __builtin_prefetch(lanes + NB * S.ahead, 0, 2);  // the next pass's word, into L2
      v[b] = _mm512_srlv_epi32(_mm512_loadu_si512(lanes), sh);
    }
#pragma GCC unroll 32
    for (int p = 0; p < D; ++p) {
      __m512 d[NB];
#pragma GCC unroll 2
      for (int b = 0; b < NB; ++b) {
        d[b] = _mm512_cvtepi32_ps(_mm512_and_si512(v[b], mask));
        if (p + 1 < D) v[b] = _mm512_srlv_epi32(v[b], step);
      }
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const __m512 xv = _mm512_set1_ps(x[t * ts + p]);
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b)
          acc[b][t][p % U] = _mm512_fmadd_ps(d[b], xv, acc[b][t][p % U]);
      }
    }
  }
}

// dot[(b * TT + t) * 16 + l] = sum over the runs [r0, r1) of row l of block b (at ``blk + b *
// S.ahead``) of xs[t] . codes
template <int NB, int TT>
void row_block_dots(const Segments& S, int64_t r0, int64_t r1, const uint32_t* blk,
                    const float* xs, int64_t ts, float* dot) {
  // independent FMA chains (a digit's FMA waits on the last one of its chain): with AVX2 two
  // (each of two halves), 1.05-1.2x faster than four (spills), session 21
#ifndef BAQ_ROWS_CHAINS
#define BAQ_ROWS_CHAINS (AVX2_PAIRS ? 2 : 4)
#endif
  constexpr int U = NB * TT >= BAQ_ROWS_CHAINS ? 1 : BAQ_ROWS_CHAINS / (NB * TT);
  __m512 acc[NB][TT][U];
  for (int b = 0; b < NB; ++b)
    for (int t = 0; t < TT; ++t)
      for (int u = 0; u < U; ++u) acc[b][t][u] = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const SegmentRun& run = S.runs[(size_t)r];
    if (run.fields) {
#define BAQ_FIELD_RUN(D) \
  case D: field_run<D, NB, TT, U>(S, run, blk, xs, ts, acc); break;
      switch (run.digits) {
        BAQ_FIELD_RUN(1) BAQ_FIELD_RUN(2) BAQ_FIELD_RUN(3) BAQ_FIELD_RUN(4) BAQ_FIELD_RUN(5)
        BAQ_FIELD_RUN(6) BAQ_FIELD_RUN(7) BAQ_FIELD_RUN(8) BAQ_FIELD_RUN(9) BAQ_FIELD_RUN(10)
        BAQ_FIELD_RUN(11) BAQ_FIELD_RUN(12) BAQ_FIELD_RUN(13) BAQ_FIELD_RUN(14)
        BAQ_FIELD_RUN(15) BAQ_FIELD_RUN(16) BAQ_FIELD_RUN(17) BAQ_FIELD_RUN(18)
        BAQ_FIELD_RUN(19) BAQ_FIELD_RUN(20) BAQ_FIELD_RUN(21) BAQ_FIELD_RUN(22)
        BAQ_FIELD_RUN(23) BAQ_FIELD_RUN(24) BAQ_FIELD_RUN(25) BAQ_FIELD_RUN(26)
        BAQ_FIELD_RUN(27) BAQ_FIELD_RUN(28) BAQ_FIELD_RUN(29) BAQ_FIELD_RUN(30)
        BAQ_FIELD_RUN(31) BAQ_FIELD_RUN(32)
        default: break;
      }
#undef BAQ_FIELD_RUN
      continue;
    }
#define BAQ_ROW_RUN(D) \
  case D: row_run<D, NB, TT, U>(S, run, blk, xs, ts, acc); break;
    switch (run.digits) {
      BAQ_ROW_RUN(1) BAQ_ROW_RUN(2) BAQ_ROW_RUN(3) BAQ_ROW_RUN(4) BAQ_ROW_RUN(5) BAQ_ROW_RUN(6)
      BAQ_ROW_RUN(7) BAQ_ROW_RUN(8) BAQ_ROW_RUN(9) BAQ_ROW_RUN(10) BAQ_ROW_RUN(11)
      BAQ_ROW_RUN(12) BAQ_ROW_RUN(13) BAQ_ROW_RUN(14) BAQ_ROW_RUN(15) BAQ_ROW_RUN(16)
      BAQ_ROW_RUN(17) BAQ_ROW_RUN(18) BAQ_ROW_RUN(19) BAQ_ROW_RUN(20) BAQ_ROW_RUN(21)
      default: break;
    }
#undef BAQ_ROW_RUN
  }
  for (int b = 0; b < NB; ++b)
    for (int t = 0; t < TT; ++t) {
      __m512 sum = acc[b][t][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[b][t][u]);
      _mm512_storeu_ps(dot + (b * TT + t) * ROW_LANES, sum);
    }
}
#else
template <int NB, int TT>
void row_block_dots(const Segments& S, int64_t r0, int64_t r1, const uint32_t* blk,
                    const float* xs, int64_t ts, float* dot) {
  for (int b = 0; b < NB; ++b) {
    float acc[TT][ROW_LANES] = {};
    const uint32_t* bb = blk + b * S.ahead;
    for (int64_t r = r0; r < r1; ++r) {
      const SegmentRun& run = S.runs[(size_t)r];
      const float* x = xs + run.first;
      for (int64_t k = run.k0; k < run.k1; ++k, x += run.digits) {
        const Segment s = S.seg[(size_t)k];
        const BaseConsts& c = S.bases[s.base];
        const uint32_t base = (uint32_t)c.base;
        uint32_t f[ROW_LANES];
        for (int l = 0; l < ROW_LANES; ++l) f[l] = (bb[s.lane + l] >> s.shift) & c.mask[s.digits];
        for (int p = 0; p < s.digits; ++p) {
          float d[ROW_LANES];
          for (int l = 0; l < ROW_LANES; ++l) {
            d[l] = (float)(f[l] % base);
            f[l] /= base;
          }
          for (int t = 0; t < TT; ++t) {
            const float xv = x[t * ts + p];
            for (int l = 0; l < ROW_LANES; ++l) acc[t][l] += d[l] * xv;
          }
        }
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int l = 0; l < ROW_LANES; ++l) dot[(b * TT + t) * ROW_LANES + l] = acc[t][l];
  }
}
#endif

// q[s * 16 + l] = the code of slot s in row l of block ``blk``, float32 (the dequantization of
// long inputs: a digit by the kernel's vector instructions, where a scalar integer division a
// digit made a 512-token prompt on the reference model 1.4x slower than float's)
#if BAQ_AVX512
inline void decode_block(const Segments& S, const uint32_t* blk, float* q) {
  float* out = q;
  for (const Segment& s : S.seg) {
    const BaseConsts& c = S.bases[s.base];
    const __m512i v =
        _mm512_srlv_epi32(_mm512_loadu_si512(blk + s.lane), _mm512_set1_epi32(s.shift));
    if (c.width > 0) {
      const __m512i mask = _mm512_set1_epi32((int)((1u << c.width) - 1));
      const __m512i step = _mm512_set1_epi32(c.width);
      __m512i u = v;
      for (int p = 0; p < s.digits; ++p, u = _mm512_srlv_epi32(u, step))
        _mm512_storeu_ps(out + p * ROW_LANES, _mm512_cvtepi32_ps(_mm512_and_si512(u, mask)));
    } else {
      const __m512 f =
          _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)c.mask[s.digits])));
      const __m512 vb = _mm512_set1_ps(c.base);
      __m512 cur = f;
      for (int p = 0; p < s.digits; ++p) {
        __m512 d = cur;
        if (p + 1 < s.digits) {
          const __m512 next = _mm512_roundscale_ps(
              _mm512_fmadd_ps(f, _mm512_set1_ps(c.inv[p + 1]), _mm512_set1_ps(c.half[p + 1])),
              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          d = _mm512_fnmadd_ps(next, vb, cur);
          cur = next;
        }
        _mm512_storeu_ps(out + p * ROW_LANES, d);
      }
    }
    out += (int64_t)s.digits * ROW_LANES;
  }
}
#else
inline void decode_block(const Segments& S, const uint32_t* blk, float* q) {
  float* out = q;
  for (const Segment& s : S.seg) {
    const BaseConsts& c = S.bases[s.base];
    const uint32_t base = (uint32_t)c.base;
    for (int l = 0; l < ROW_LANES; ++l) {
      uint32_t f = (blk[s.lane + l] >> s.shift) & c.mask[s.digits];
      for (int p = 0; p < s.digits; ++p, f /= base) out[p * ROW_LANES + l] = (float)(f % base);
    }
    out += (int64_t)s.digits * ROW_LANES;
  }
}
#endif

// blocks that share a pass over the segments: two at one token (they share the segments'
// constants and the inputs' broadcasts: 1.04-1.12x faster on 576x1536 to 4096x14336, AVX2, one
// thread), else one (at two tokens the accumulators spill), session 21
#ifndef BAQ_ROWS_NB
#define BAQ_ROWS_NB 2
#endif
inline int blocks_together(int tt) { return tt == 1 ? BAQ_ROWS_NB : 1; }

void row_dots(int nb, int tt, const Segments& S, int64_t r0, int64_t r1, const uint32_t* blk,
              const float* xs, int64_t ts, float* dot) {
  if (nb == 2) {
    row_block_dots<2, 1>(S, r0, r1, blk, xs, ts, dot);
    return;
  }
  switch (tt) {
    case 1: row_block_dots<1, 1>(S, r0, r1, blk, xs, ts, dot); break;
    case 2: row_block_dots<1, 2>(S, r0, r1, blk, xs, ts, dot); break;
    case 3: row_block_dots<1, 3>(S, r0, r1, blk, xs, ts, dot); break;
#ifndef BAQ_AVX2_PAIRS
    case 4: row_block_dots<1, 4>(S, r0, r1, blk, xs, ts, dot); break;
    case 5: row_block_dots<1, 5>(S, r0, r1, blk, xs, ts, dot); break;
    case 6: row_block_dots<1, 6>(S, r0, r1, blk, xs, ts, dot); break;
    case 7: row_block_dots<1, 7>(S, r0, r1, blk, xs, ts, dot); break;
    default: row_block_dots<1, 8>(S, r0, r1, blk, xs, ts, dot); break;
#else
    default: row_block_dots<1, 4>(S, r0, r1, blk, xs, ts, dot); break;
#endif
  }
}

// float16 -> float32, exact (every float16 is a float32): the ranges of a layer saved in
// float16 are read as they are kept, so a forward widens them here and not by torch operators
// (13 us a call on a 576x1536 layer, a tenth of its forward at one token, session 22)
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero and subnormals: man * 2^-24, exact in float32
    const float v = std::ldexp((float)man, -24);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);  // infinities, NaNs
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// out[i] = the float16 in[i], i < n: eight an instruction where the processor converts them
// (F16C; the portable build keeps the scalar conversion, so the tests check both)
inline void widen_halves(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && !defined(BAQ_PORTABLE)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(in + i))));
#endif
  for (; i < n; ++i) out[i] = half_to_float(in[i]);
}

// a layer's ranges as float32: the caller's arrays (half = 0) or their widened copy (half = 1,
// uint16 float16 bits); n entries each. Per IC with row groups n is rows / group x cols (3.7 M
// on a 4096x14336 layer in groups of 16 rows): widened in parallel, by F16C where it exists,
// a scalar loop made its call 1.4x slower than with ranges widened by torch (session 22)
struct Ranges {
  std::vector<float> buf;
  const float *lo, *hi;
  Ranges(const void* lo_p, const void* hi_p, int64_t n, int half) {
    if (!half) {
      lo = static_cast<const float*>(lo_p), hi = static_cast<const float*>(hi_p);
      return;
    }
    buf.resize((size_t)(2 * n));
    const uint16_t *l = static_cast<const uint16_t*>(lo_p), *h = static_cast<const uint16_t*>(hi_p);
    float* out = buf.data();
    at::parallel_for(0, n, 1 << 15, [&](int64_t a, int64_t b) {
      widen_halves(l + a, out + a, b - a);
      widen_halves(h + a, out + n + a, b - a);
    });
    lo = out, hi = out + n;
  }
};

}  // namespace

extern "C" {

// the vector loops this build runs: 512 (AVX512, or its emulation in the tests), 256 (AVX2 pairs),
// 0 (the portable loops)
int baq_lanes_isa() {
#ifdef BAQ_AVX2_PAIRS
  return 256;
#else
  return BAQ_AVX512 ? 512 : 0;
#endif
}

// y (T, rows) = x (T, cols) W^T (+ bias); lo, hi: the float32 ranges ((rows, G) per OC, (G,
// cols) per IC). Returns 0, or 1 when the scratch could not be allocated.
int baq_lanes_linear(const Layout* Lp, const void* lo_p, const void* hi_p, int half,
                     const float* x, int64_t T, const float* bias, float* y) {
  const Layout& L = *Lp;
  const Ranges ranges(lo_p, hi_p, L.ic ? L.nrg * L.cols : L.rows * L.ngc, half);
  const float *lo = ranges.lo, *hi = ranges.hi;
  const int64_t S = L.nslots, R = L.ic ? L.nrg : 1, G = L.ngc;  // per IC: ngc = 1
  // the scaled input in slot order, per row group (per IC) and token
  AlignedFloats xs_buf((size_t)(R * T * S));
  std::vector<double> X((size_t)(T * L.K)), zterm((size_t)(R * T));
  std::vector<float> clm1((size_t)L.K + 1);
  for (int64_t c = 0; c < L.K; ++c) clm1[c] = (float)(L.classes[4 * c + 1] - 1);
  if (!xs_buf.p) return 1;
  float* xs = xs_buf.p;
  for (int64_t gr = 0; gr < R; ++gr) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t j = L.slot_col[s];
      if (j < 0) continue;
      const float lm1 = L.slot_lm1[s];
      float step = 0.0f, z = 0.0f;
      if (L.ic) {
        const float l = lo[gr * L.cols + j], span = hi[gr * L.cols + j] - l;
        step = span / lm1;
        z = zero_point(l, span, lm1, L.sym);
      }
      for (int64_t t = 0; t < T; ++t) {
        const float v = L.ic ? x[t * L.cols + j] * step : x[t * L.cols + j] / lm1;
        xs[(gr * T + t) * S + s] = v;
        if (L.ic) zterm[gr * T + t] += (double)v * (double)z;
      }
    }
  }
  if (!L.ic)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < L.K; ++c) {
        double sum = 0.0;
        for (int64_t s = L.classes[4 * c + 2]; s < L.classes[4 * c + 3]; ++s) sum += xs[t * S + s];
        X[t * L.K + c] = sum;
      }
  // rows in blocks of ROWS_BLOCK, every token tile over a block: the block's codes stay in cache
  // while each tile's inputs (8 tokens, 32 KiB per 1024 columns) pass over them
  constexpr int64_t ROWS_BLOCK = 16;
  at::parallel_for(0, L.rows, ROWS_BLOCK, [&](int64_t r0, int64_t r1) {
    constexpr int NRMAX = 4;
    std::vector<double> zt((size_t)(NRMAX * G * TMAX));
    std::vector<float> z((size_t)L.K + 1), dot(NRMAX * TMAX);
    for (int64_t rb = r0; rb < r1; rb += ROWS_BLOCK)
      for (int64_t t0 = 0; t0 < T; t0 += TMAX) {
        const int tt = (int)std::min<int64_t>(TMAX, T - t0);
        const int64_t rend = std::min(r1, rb + ROWS_BLOCK);
        for (int64_t r = rb; r < rend;) {
          int nr = rows_together(tt);
          const int64_t gr = (L.ic && L.rsize > 0) ? r / L.rsize : 0;
          // rows that share the pass must share the scaled input (per IC: one row group)
          if (r + nr > rend || (L.ic && L.rsize > 0 && (r + nr - 1) / L.rsize != gr)) nr = 1;
          const float* xr = xs + (gr * T + t0) * S;
          double out[NRMAX][TMAX] = {};
          for (int i = 0; i < nr && !L.ic; ++i) {  // zero points of the classes, their sums
            const int64_t ri = r + i;
            for (int64_t g = 0; g < G; ++g) {
              const float l = lo[ri * L.ngc + g], span = hi[ri * L.ngc + g] - l;
              const int64_t c0 = L.gclass[g], c1 = L.gclass[g + 1];
              if (L.sym)
                for (int64_t c = c0; c < c1; ++c) z[c] = std::floor((clm1[c] + 1.0f) * 0.5f);
              else
                zero_points(l, span, clm1.data(), z.data(), c0, c1);
              for (int t = 0; t < tt; ++t) {
                // 8 partial sums in a fixed order: vectorised, the same for any thread count
                double part[8] = {};
                const double* Xt = X.data() + (t0 + t) * L.K;
                int64_t c = c0;
                for (; c + 8 <= c1; c += 8)
                  for (int k = 0; k < 8; ++k) part[k] += (double)z[c + k] * Xt[c + k];
                for (; c < c1; ++c) part[0] += (double)z[c] * Xt[c];
                zt[(i * G + g) * TMAX + t] = ((part[0] + part[1]) + (part[2] + part[3])) +
                                             ((part[4] + part[5]) + (part[6] + part[7]));
              }
            }
          }
          for (int64_t g = 0; g < G; ++g) {
            dots(nr, tt, L, r, xr, S, L.grun[g], L.grun[g + 1], dot.data());
            for (int i = 0; i < nr; ++i) {
              const float* d = dot.data() + i * tt;
              if (L.ic) {
                for (int t = 0; t < tt; ++t) out[i][t] += (double)d[t];
              } else {
                const int64_t ri = r + i;
                const double span = (double)(hi[ri * L.ngc + g] - lo[ri * L.ngc + g]);
                for (int t = 0; t < tt; ++t)
                  out[i][t] += span * ((double)d[t] - zt[(i * G + g) * TMAX + t]);
              }
            }
          }
          for (int i = 0; i < nr; ++i)
            for (int t = 0; t < tt; ++t) {
              double v = out[i][t] - (L.ic ? zterm[gr * T + t0 + t] : 0.0);
              if (bias) v += (double)bias[r + i];
              y[(t0 + t) * L.rows + r + i] = (float)v;
            }
          r += nr;
        }
      }
  });
  return 0;
}

// rows [r0, r1) of W in the original column order, float32: (q - z) * step as
// quant/grid.py dequantize_codes, bit for bit; out (r1 - r0, cols) must be zeroed (L = 1: 0).
// A row's codes are decoded in slot order, then each class (per IC: each slot) scales its run.
void baq_lanes_dequantize(const Layout* Lp, const float* lo, const float* hi, int64_t r0,
                          int64_t r1, float* out) {
  const Layout& L = *Lp;
  const int64_t S = L.nslots, R = L.ic ? L.nrg : 1;
  // per IC the step and zero point of every (row group, slot), once
  std::vector<float> step_ic(L.ic ? (size_t)(R * S) : 0), zero_ic(L.ic ? (size_t)(R * S) : 0);
  for (int64_t gr = 0; L.ic && gr < R; ++gr)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t j = L.slot_col[s];
      if (j < 0) continue;
      const float l = lo[gr * L.cols + j], span = hi[gr * L.cols + j] - l;
      step_ic[gr * S + s] = span / L.slot_lm1[s];
      zero_ic[gr * S + s] = zero_point(l, span, L.slot_lm1[s], L.sym);
    }
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    std::vector<float> q((size_t)S);
    for (int64_t r = a; r < b; ++r) {
      const uint32_t* row = L.words + r * L.rowwords;
      const Tails<1> tails(L, r);
      const int64_t nruns = L.grun[L.ngc];
      for (int64_t ri = 0; ri < nruns; ++ri) {
        const int32_t* run = L.runs + 4 * ri;
        for (int64_t k = run[0]; k < run[1]; ++k) {
          const bool tail = run[3] == 0 && in_tail(L, k);
          const uint32_t* v = tail ? tails.lanes(L, k, 0) : row + L.chunk_word[k];
          const FieldReader read(run[2], run[3], tail ? tails.shift(L, k, 0) : L.chunk_shift[k]);
          for (int l = 0; l < CHUNK; ++l) q[k * CHUNK + l] = (float)read(v[l]);
        }
      }
      float* o = out + (r - r0) * L.cols;
      if (L.ic) {
        const int64_t gr = L.rsize > 0 ? r / L.rsize : 0;
        const float *st = step_ic.data() + gr * S, *ze = zero_ic.data() + gr * S;
        for (int64_t s = 0; s < S; ++s)
          if (L.slot_col[s] >= 0) o[L.slot_col[s]] = (q[s] - ze[s]) * st[s];
        continue;
      }
      for (int64_t c = 0; c < L.K; ++c) {
        const int64_t g = L.classes[4 * c];
        const float l = lo[r * L.ngc + g], span = hi[r * L.ngc + g] - l;
        const float lm1 = (float)(L.classes[4 * c + 1] - 1);
        const float st = span / lm1, ze = zero_point(l, span, lm1, L.sym);
        for (int64_t s = L.classes[4 * c + 2]; s < L.classes[4 * c + 3]; ++s)
          o[L.slot_col[s]] = (q[s] - ze) * st;
      }
    }
  });
}

// y (T, n) = R x of every token for the rotation of quant/rotation.py, R = (H_h kron H_p)
// diag(signs) / sqrt(n): the signs, the Walsh-Hadamard butterfly on each of the h rows of p = n /
// h entries (Sylvester's H_p, the order of rotation.fwht), then the (h, h) factor ``hh`` (row
// major; nullptr for h = 1) on the left, then / sqrt(n) in float32. The same transform by
// torch operators took 87-193 us a token on the reference model's widths, more than the product
// itself (session 20): here it is O(n (log p + h)) arithmetic and no dispatch.
void baq_rotate(const float* x, int64_t T, int64_t n, int64_t h, const float* signs,
                const float* hh, float* y) {
  const int64_t p = n / h;
  const float root = (float)std::sqrt((double)n);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> z((size_t)n);
    for (int64_t t = t0; t < t1; ++t) {
      const float* xt = x + t * n;
      float* yt = y + t * n;
      for (int64_t i = 0; i < n; ++i) z[i] = xt[i] * signs[i];
      for (int64_t r = 0; r < h; ++r) {
        float* v = z.data() + r * p;
        for (int64_t half = 1; half < p; half *= 2)
          for (int64_t i = 0; i < p; i += 2 * half)
            for (int64_t j = i; j < i + half; ++j) {
              const float a = v[j], b = v[j + half];
              v[j] = a + b;
              v[j + half] = a - b;
            }
      }
      if (h == 1) {
        for (int64_t i = 0; i < n; ++i) yt[i] = z[i] / root;
        continue;
      }
      for (int64_t r = 0; r < h; ++r) {
        float* o = yt + r * p;
        for (int64_t c = 0; c < p; ++c) o[c] = 0.0f;
        for (int64_t k = 0; k < h; ++k) {
          const float a = hh[r * h + k];
          const float* v = z.data() + k * p;
          for (int64_t c = 0; c < p; ++c) o[c] += a * v[c];
        }
        for (int64_t c = 0; c < p; ++c) o[c] /= root;
      }
    }
  });
}

// y (T, rows) = x (T, cols) W^T (+ bias) for a row-lane layout; lo, hi as baq_lanes_linear.
// Returns 0, or 1 when the scratch could not be allocated.
int baq_rows_linear(const RowLayout* Lp, const void* lo_p, const void* hi_p, int half,
                    const float* x, int64_t T, const float* bias, float* y) {
  const RowLayout& L = *Lp;
  const Ranges ranges(lo_p, hi_p, L.ic ? L.nrg * L.cols : L.rows * L.ngc, half);
  const float *lo = ranges.lo, *hi = ranges.hi;
  const int64_t S = L.nslots, R = L.ic ? L.nrg : 1, G = L.ngc;  // per IC: ngc = 1
  AlignedFloats xs_buf((size_t)(R * T * S));
  if (!xs_buf.p) return 1;
  float* xs = xs_buf.p;
  std::vector<double> X((size_t)(T * L.K)), zterm((size_t)(R * T));
  std::vector<float> clm1((size_t)L.K + 1);
  for (int64_t c = 0; c < L.K; ++c) clm1[c] = (float)(L.classes[4 * c + 1] - 1);
  for (int64_t gr = 0; gr < R; ++gr)
    for (int64_t c = 0; c < L.K; ++c) {
      const float lm1 = clm1[c];
      for (int64_t s = L.classes[4 * c + 2]; s < L.classes[4 * c + 3]; ++s) {
        const int64_t j = slot_column(L, s);
        float step = 0.0f, z = 0.0f;
        if (L.ic) {
          const float l = lo[gr * L.cols + j], span = hi[gr * L.cols + j] - l;
          step = span / lm1;
          z = zero_point(l, span, lm1, L.sym);
        }
        for (int64_t t = 0; t < T; ++t) {
          const float v = L.ic ? x[t * L.cols + j] * step : x[t * L.cols + j] / lm1;
          xs[(gr * T + t) * S + s] = v;
          if (L.ic) zterm[gr * T + t] += (double)v * (double)z;
        }
      }
    }
  if (!L.ic)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < L.K; ++c) {
        double sum = 0.0;
        for (int64_t s = L.classes[4 * c + 2]; s < L.classes[4 * c + 3]; ++s) sum += xs[t * S + s];
        X[t * L.K + c] = sum;
      }
  const Segments segs = segments_of(L);
  const int64_t nblocks = (L.rows + ROW_LANES - 1) / ROW_LANES;
  constexpr int NBMAX = 2, PASS = NBMAX * ROW_LANES;  // blocks, rows a pass at most
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> zt((size_t)(PASS * G * TMAX));
    std::vector<float> z((size_t)L.K + 1), dot(PASS * TMAX);
    for (int64_t b = b0; b < b1;) {
      const int64_t row0 = b * ROW_LANES;
      const int64_t gr = (L.ic && L.rsize > 0) ? row0 / L.rsize : 0;
      // blocks of a pass share the scaled input (per IC: one row group)
      int nb = (int)std::min<int64_t>(blocks_together((int)std::min<int64_t>(T, TMAX)), b1 - b);
      if (nb > 1 && L.ic && L.rsize > 0 && (row0 + ROW_LANES) / L.rsize != gr) nb = 1;
      const int64_t nr = std::min<int64_t>(nb * ROW_LANES, L.rows - row0);
      const uint32_t* blk = L.words + b * L.nwords * ROW_LANES;
      for (int64_t t0 = 0; t0 < T; t0 += TMAX) {
        const int tt = (int)std::min<int64_t>(TMAX, T - t0);
        const float* xr = xs + (gr * T + t0) * S;
        double out[PASS][TMAX] = {};
        for (int64_t i = 0; i < nr && !L.ic; ++i) {  // zero points of the classes, their sums
          const int64_t ri = row0 + i;
          for (int64_t g = 0; g < G; ++g) {
            const float l = lo[ri * L.ngc + g], span = hi[ri * L.ngc + g] - l;
            const int64_t c0 = L.gclass[g], c1 = L.gclass[g + 1];
            if (L.sym)
              for (int64_t c = c0; c < c1; ++c) z[c] = std::floor((clm1[c] + 1.0f) * 0.5f);
            else
              zero_points(l, span, clm1.data(), z.data(), c0, c1);
            for (int t = 0; t < tt; ++t) {
              double part[8] = {};
              const double* Xt = X.data() + (t0 + t) * L.K;
              int64_t c = c0;
              for (; c + 8 <= c1; c += 8)
                for (int k = 0; k < 8; ++k) part[k] += (double)z[c + k] * Xt[c + k];
              for (; c < c1; ++c) part[0] += (double)z[c] * Xt[c];
              zt[(i * G + g) * TMAX + t] = ((part[0] + part[1]) + (part[2] + part[3])) +
                                           ((part[4] + part[5]) + (part[6] + part[7]));
            }
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          row_dots(nb, tt, segs, segs.group_run[g], segs.group_run[g + 1], blk, xr, S,
                   dot.data());
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t ri = row0 + i;
            const double span = L.ic ? 1.0 : (double)(hi[ri * L.ngc + g] - lo[ri * L.ngc + g]);
            // dot holds block i / 16's tokens one after another, 16 rows each
            const float* d = dot.data() + (i / ROW_LANES) * tt * ROW_LANES + i % ROW_LANES;
            for (int t = 0; t < tt; ++t) {
              const double v = (double)d[t * ROW_LANES];
              out[i][t] += L.ic ? v : span * (v - zt[(i * G + g) * TMAX + t]);
            }
          }
        }
        for (int64_t i = 0; i < nr; ++i)
          for (int t = 0; t < tt; ++t) {
            double v = out[i][t] - (L.ic ? zterm[gr * T + t0 + t] : 0.0);
            if (bias) v += (double)bias[row0 + i];
            y[(t0 + t) * L.rows + row0 + i] = (float)v;
          }
      }
      b += nb;
    }
  });
  return 0;
}

// rows [r0, r1) of W in the original column order, float32, bit for bit the weights of
// quant/grid.py dequantize_codes (as baq_lanes_dequantize); out (r1 - r0, cols) zeroed.
void baq_rows_dequantize(const RowLayout* Lp, const float* lo, const float* hi, int64_t r0,
                         int64_t r1, float* out) {
  const RowLayout& L = *Lp;
  const int64_t S = L.nslots, R = L.ic ? L.nrg : 1;
  const Segments segs = segments_of(L);
  std::vector<float> step_ic(L.ic ? (size_t)(R * S) : 0), zero_ic(L.ic ? (size_t)(R * S) : 0);
  for (int64_t gr = 0; L.ic && gr < R; ++gr)
    for (int64_t c = 0; c < L.K; ++c) {
      const float lm1 = (float)(L.classes[4 * c + 1] - 1);
      for (int64_t s = L.classes[4 * c + 2]; s < L.classes[4 * c + 3]; ++s) {
        const int64_t j = slot_column(L, s);
        const float l = lo[gr * L.cols + j], span = hi[gr * L.cols + j] - l;
        step_ic[gr * S + s] = span / lm1;
        zero_ic[gr * S + s] = zero_point(l, span, lm1, L.sym);
      }
    }
  at::parallel_for(r0, r1, ROW_LANES, [&](int64_t a, int64_t b) {
    AlignedFloats block((size_t)(S * ROW_LANES));  // q[s * 16 + lane] of one block
    int64_t decoded = -1;
    for (int64_t r = a; r < b; ++r) {
      if (r / ROW_LANES != decoded) {
        decoded = r / ROW_LANES;
        decode_block(segs, L.words + decoded * L.nwords * ROW_LANES, block.p);
      }
      const float* q = block.p + r % ROW_LANES;  // slot s at q[s * 16]
      float* o = out + (r - r0) * L.cols;
      if (L.ic) {
        const int64_t gr = L.rsize > 0 ? r / L.rsize : 0;
        const float *st = step_ic.data() + gr * S, *ze = zero_ic.data() + gr * S;
        for (int64_t s = 0; s < S; ++s) o[slot_column(L, s)] = (q[s * ROW_LANES] - ze[s]) * st[s];
        continue;
      }
      for (int64_t c = 0; c < L.K; ++c) {
        const int64_t g = L.classes[4 * c];
        const float l = lo[r * L.ngc + g], span = hi[r * L.ngc + g] - l;
        const float lm1 = (float)(L.classes[4 * c + 1] - 1);
        const float st = span / lm1, ze = zero_point(l, span, lm1, L.sym);
        for (int64_t s = L.classes[4 * c + 2]; s < L.classes[4 * c + 3]; ++s)
          o[slot_column(L, s)] = (q[s * ROW_LANES] - ze) * st;
      }
    }
  });
}

}  // extern "C"
