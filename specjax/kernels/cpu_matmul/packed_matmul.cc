// y[M, N] = x[M, K] @ W^T on the CPU, W kept in its packed row format, registered through
// XLA's FFI (jax.ffi) as "specjax_packed_matmul".
//
// W is N rows (output features) of K inputs each, every row stored as `row_bytes` bytes in one
// of the formats below (GGUF's block formats keep their own byte layout, so a checkpoint's
// tensors are used as they are in the file). Per output row, on the AVX2 path for Q8_0, Q4_0,
// Q4_1 and I8, each 32-value block is dequantised into four registers and multiplied with up to
// 8 rows of x at once (tiles of 8 rows); otherwise the row is dequantised once into a float32
// buffer that stays in L1, then dotted with every row of x. Either way a weight's bytes come
// from memory once per call. Activations and accumulation are float32, and the dequantised
// values equal the portable code's and gguf's numpy ones (only the summation order differs from
// a float32 matmul). Output rows are split among the XLA CPU client's intra-op threads.
//
// Formats (`fmt` attribute; the numbers are shared with specjax/packed.py):
//   0 F32   row = K float32
//   1 Q8_0  blocks of 32: f16 d, int8 q[32]; w = d * q                           (34 B)
//   2 Q4_0  blocks of 32: f16 d, u8 qs[16]; w[j] = d * (lo(qs[j]) - 8),
//                                          w[j + 16] = d * (hi(qs[j]) - 8)       (18 B)
//   3 Q4_1  blocks of 32: f16 d, f16 m, u8 qs[16]; w = d * nibble + m            (20 B)
//   4 I8    row = K int8, one float32 scale per row (the `scale` operand): w = s[n] * q
//   5 Q4_K  super-blocks of 256: f16 d, f16 dmin, u8 scales[12], u8 qs[128]      (144 B)
//   6 Q6_K  super-blocks of 256: u8 ql[128], u8 qh[64], int8 scales[16], f16 d   (210 B)
//   7 Q5_0  blocks of 32: f16 d, u32 qh (LE), u8 qs[16]; q = nibble | bit << 4,
//           bit j of qh for value j; w = d * (q - 16)                           (22 B)
// The block layouts are GGUF's (ggml's "block_q4_1" etc.).
//
// 8-bit activations (the `act8` attribute, Q8_0 / Q4_0 / Q4_1 weights only): every 32-value
// block of every row of x is first quantised as GGUF's Q8_0 quantises (dx = max|x| * (1/127),
// qx = round-half-even(x * (1 / dx)), 0 for an all-zero block); a weight block times an
// activation block is then  d_w * dx * sum(qw * qx) + m_w * dx * sum(qx)  with exact integer
// sums (Q4_1: m_w its min; Q4_0: m_w = -8 d_w; Q8_0: m_w = 0). This is llama.cpp's way of
// computing with these formats: integer multiply-adds (AVX2 `vpmaddubsw`, 32 products per
// instruction) instead of float FMAs (8 per instruction), at the price of rounding x to 8 bits:
// another model than the float32 one (specjax/packed.py: quantize_activations is the reference).
//
// Instruction sets (each compiled with a target attribute, so the file builds for any x86-64;
// the path is chosen once per process from the CPU's features, and a call's `isa` attribute can
// cap it: the tests run every path the CPU has):
//   portable  plain C++;
//   AVX2      + FMA + F16C: the fused block path (Q8_0, Q4_0, Q4_1, I8) in 8-lane registers, the
//             I8 row dequantiser, the dot products, 8-bit activations via vpmaddubsw/vpmaddwd;
//   AVX-512   (F, BW, VL, DQ): the fused block path in 16-lane registers (a block in two); the
//             rest (row buffers, 8-bit activations) as AVX2.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPECJAX_X86 1
#else
#define SPECJAX_X86 0
#endif

namespace ffi = xla::ffi;

namespace specjax {
namespace {

enum Format : int64_t { kF32 = 0, kQ8_0 = 1, kQ4_0 = 2, kQ4_1 = 3, kI8 = 4, kQ4_K = 5,
                        kQ6_K = 6, kQ5_0 = 7, kNumFormats = 8 };

// Values per block and bytes per block of each format (F32 and I8: one "block" per value).
constexpr int64_t kBlockValues[kNumFormats] = {1, 32, 32, 32, 1, 256, 256, 32};
constexpr int64_t kBlockBytes[kNumFormats] = {4, 34, 18, 20, 1, 144, 210, 22};

// IEEE half -> float, exact for every input (subnormals, infinities, NaN).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float LoadHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return HalfToFloat(h);
}

// ---- Portable dequantisers: one row of K values into out[K]. -------------------------------

void DequantQ8_0(const uint8_t* row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / 32; ++b, row += 34, out += 32) {
    const float d = LoadHalf(row);
    const int8_t* q = reinterpret_cast<const int8_t*>(row + 2);
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
  }
}

void DequantQ4_0(const uint8_t* row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / 32; ++b, row += 18, out += 32) {
    const float d = LoadHalf(row);
    const uint8_t* qs = row + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>((qs[j] & 0x0F) - 8);
      out[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
    }
  }
}

void DequantQ4_1(const uint8_t* row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / 32; ++b, row += 20, out += 32) {
    const float d = LoadHalf(row), m = LoadHalf(row + 2);
    const uint8_t* qs = row + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
      out[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
    }
  }
}

void DequantQ5_0(const uint8_t* row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / 32; ++b, row += 22, out += 32) {
    const float d = LoadHalf(row);
    const uint32_t qh = static_cast<uint32_t>(row[2]) | (static_cast<uint32_t>(row[3]) << 8) |
                        (static_cast<uint32_t>(row[4]) << 16) |
                        (static_cast<uint32_t>(row[5]) << 24);
    const uint8_t* qs = row + 6;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
      const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      out[j] = d * static_cast<float>(lo - 16);
      out[j + 16] = d * static_cast<float>(hi - 16);
    }
  }
}

void DequantI8(const uint8_t* row, int64_t k, float scale, float* out) {
  const int8_t* q = reinterpret_cast<const int8_t*>(row);
  for (int64_t j = 0; j < k; ++j) out[j] = scale * static_cast<float>(q[j]);
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K super-block.
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void DequantQ4_K(const uint8_t* row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / 256; ++b, row += 144) {
    const float d = LoadHalf(row), dmin = LoadHalf(row + 2);
    const uint8_t* scales = row + 4;
    const uint8_t* q = row + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
      uint8_t sc, mn;
      ScaleMinK4(is, scales, &sc, &mn);
      const float d1 = d * sc, m1 = dmin * mn;
      ScaleMinK4(is + 1, scales, &sc, &mn);
      const float d2 = d * sc, m2 = dmin * mn;
      for (int l = 0; l < 32; ++l) *out++ = d1 * static_cast<float>(q[l] & 0x0F) - m1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void DequantQ6_K(const uint8_t* row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / 256; ++b, row += 210) {
    const uint8_t* ql = row;
    const uint8_t* qh = row + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(row + 192);
    const float d = LoadHalf(row + 208);
    for (int n = 0; n < 256; n += 128, out += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * sc[is + 0] * q1;
        out[l + 32] = d * sc[is + 2] * q2;
        out[l + 64] = d * sc[is + 4] * q3;
        out[l + 96] = d * sc[is + 6] * q4;
      }
    }
  }
}

// Portable dot products of w[K] with R rows of x (row stride ldx), 8 partial sums per row.
void DotRowsPortable(const float* w, const float* x, int64_t ldx, int64_t k, int64_t rows,
                     float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= k; j += 8)
      for (int l = 0; l < 8; ++l) acc[l] += w[j + l] * xr[j + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < k; ++j) s += w[j] * xr[j];
    y[r * ldy] = s;
  }
}

// Calls tile(std::integral_constant<int, R>(), r) for the row tiles of m rows: tiles of Max
// rows, then one tile of the rest (R = 1..Max-1).
template <int R, typename Tile>
inline void LastRowTile(int64_t rest, int64_t r, Tile& tile) {
  if constexpr (R > 0) {
    if (rest == R) tile(std::integral_constant<int, R>(), r);
    else LastRowTile<R - 1>(rest, r, tile);
  }
}

template <int Max, typename Tile>
inline void ForRowTiles(int64_t m, Tile tile) {
  int64_t r = 0;
  for (; r + Max <= m; r += Max) tile(std::integral_constant<int, Max>(), r);
  LastRowTile<Max - 1>(m - r, r, tile);
}

// Whether (fmt, K) takes a fused block path (Q8_0, Q4_0, Q4_1, I8 with K a multiple of 32); if
// so, calls rows(std::integral_constant<int64_t, F>()).
template <typename Rows>
inline bool ForFusedFormat(int64_t fmt, int64_t k, Rows rows) {
  if (k % 32 != 0) return false;
  switch (fmt) {
    case kQ8_0: rows(std::integral_constant<int64_t, kQ8_0>()); return true;
    case kQ4_0: rows(std::integral_constant<int64_t, kQ4_0>()); return true;
    case kQ4_1: rows(std::integral_constant<int64_t, kQ4_1>()); return true;
    case kI8: rows(std::integral_constant<int64_t, kI8>()); return true;
    default: return false;
  }
}

#if SPECJAX_X86
// ---- AVX2 + FMA versions of the hot dequantisers and the dot products. ---------------------

#define SPECJAX_AVX2 __attribute__((target("avx2,fma,f16c")))

SPECJAX_AVX2 inline float LoadHalfF16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

SPECJAX_AVX2 inline void StoreI8x8(const uint8_t* p, __m256 scale, float* out) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), scale));
}

SPECJAX_AVX2 void DequantI8Avx2(const uint8_t* row, int64_t k, float scale, float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) StoreI8x8(row + j, s, out + j);
  const int8_t* q = reinterpret_cast<const int8_t*>(row);
  for (; j < k; ++j) out[j] = scale * static_cast<float>(q[j]);
}

SPECJAX_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot products of w[K] with R (1..4) rows of x; two accumulators per row (four for one row) keep
// the FMA pipes busy.
template <int R>
SPECJAX_AVX2 void DotTileAvx2(const float* w, const float* x, int64_t ldx, int64_t k,
                              float* y, int64_t ldy) {
  constexpr int A = R == 1 ? 4 : 2;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 * A <= k; j += 8 * A) {
    __m256 wv[A];
    for (int a = 0; a < A; ++a) wv[a] = _mm256_loadu_ps(w + j + 8 * a);
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a)
        acc[r][a] = _mm256_fmadd_ps(wv[a], _mm256_loadu_ps(x + r * ldx + j + 8 * a), acc[r][a]);
  }
  for (; j + 8 <= k; j += 8) {
    const __m256 wv = _mm256_loadu_ps(w + j);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + j), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[r][a]);
    float s = HorizontalSum(total);
    for (int64_t t = j; t < k; ++t) s += w[t] * x[r * ldx + t];
    y[r * ldy] = s;
  }
}

SPECJAX_AVX2 void DotRowsAvx2(const float* w, const float* x, int64_t ldx, int64_t k,
                              int64_t rows, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) DotTileAvx2<4>(w, x + r * ldx, ldx, k, y + r * ldy, ldy);
  switch (rows - r) {
    case 3: DotTileAvx2<3>(w, x + r * ldx, ldx, k, y + r * ldy, ldy); break;
    case 2: DotTileAvx2<2>(w, x + r * ldx, ldx, k, y + r * ldy, ldy); break;
    case 1: DotTileAvx2<1>(w, x + r * ldx, ldx, k, y + r * ldy, ldy); break;
    default: break;
  }
}

// ---- Fused AVX2 path: a block is dequantised into four registers and multiplied with up to
// four rows of x at once, with no buffer in between (Q8_0, Q4_0, Q4_1, and I8 when K is a
// multiple of 32). The weights' values are computed exactly as the portable dequantisers do.

SPECJAX_AVX2 inline __m256 U8x8(__m128i bytes8) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8));
}
SPECJAX_AVX2 inline __m256 I8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The 32 values of block b of a row, in w[0..3] (8 each, in order).
template <int64_t F>
SPECJAX_AVX2 inline void BlockValues(const uint8_t* row, int64_t b, float row_scale, __m256* w) {
  if constexpr (F == kQ8_0) {
    const uint8_t* blk = row + b * 34;
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(blk));
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(I8x8(blk + 2 + 8 * j), d);
  } else if constexpr (F == kI8) {
    const __m256 s = _mm256_set1_ps(row_scale);
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(I8x8(row + b * 32 + 8 * j), s);
  } else {
    constexpr bool kHasMin = F == kQ4_1;
    const uint8_t* blk = row + b * (kHasMin ? 20 : 18);
    const float df = LoadHalfF16c(blk);
    const __m256 d = _mm256_set1_ps(df);
    const __m256 bias = _mm256_set1_ps(kHasMin ? LoadHalfF16c(blk + 2) : -8.0f * df);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (kHasMin ? 4 : 2)));
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(q, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), low_mask);
    // d * q is exact in float32 (q < 16), so d * q + bias rounds once, like the portable code.
    w[0] = _mm256_fmadd_ps(U8x8(lo), d, bias);
    w[1] = _mm256_fmadd_ps(U8x8(_mm_srli_si128(lo, 8)), d, bias);
    w[2] = _mm256_fmadd_ps(U8x8(hi), d, bias);
    w[3] = _mm256_fmadd_ps(U8x8(_mm_srli_si128(hi, 8)), d, bias);
  }
}

// y[r * ldy] = row . x[r] for R (1..8) rows of x. Every row's FMAs into its accumulators form
// independent chains; 8 chains in all cover the FMA latency.
template <int64_t F, int R>
SPECJAX_AVX2 void FusedTile(const uint8_t* row, int64_t k, float row_scale, const float* x,
                            int64_t ldx, float* y, int64_t ldy) {
  constexpr int A = R <= 2 ? 4 : (R <= 4 ? 2 : 1);  // independent accumulators per row
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / 32; ++b) {
    __m256 w[4];
    BlockValues<F>(row, b, row_scale, w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * 32;
      for (int j = 0; j < 4; ++j)
        acc[r][j % A] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), acc[r][j % A]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[r][a]);
    y[r * ldy] = HorizontalSum(total);
  }
}

// Output row `row` . x[r] into y[r * ldy] for every row r of x, in tiles of up to 8 rows.
template <int64_t F>
SPECJAX_AVX2 void FusedRows(const uint8_t* row, int64_t k, float row_scale, const float* x,
                            int64_t m, float* y, int64_t ldy) {
  ForRowTiles<8>(m, [&](auto rows, int64_t r) SPECJAX_AVX2 {
    FusedTile<F, decltype(rows)::value>(row, k, row_scale, x + r * k, k, y + r * ldy, ldy);
  });
}

// Whether (fmt, K) takes the fused path; if so, computes output row n into y.
SPECJAX_AVX2 bool FusedRow(int64_t fmt, const uint8_t* row, int64_t k, float row_scale,
                           const float* x, int64_t m, float* y, int64_t ldy) {
  return ForFusedFormat(fmt, k, [&](auto f) SPECJAX_AVX2 {
    FusedRows<decltype(f)::value>(row, k, row_scale, x, m, y, ldy);
  });
}

// ---- AVX-512 (F, BW, VL, DQ) versions of the fused block path and the 8-bit products -------

#define SPECJAX_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// The 32 values of block b of a row, in w[0] (values 0..15) and w[1] (16..31), computed as the
// portable dequantisers do (d * q exact, + bias rounded once).
template <int64_t F>
SPECJAX_AVX512 inline void BlockValues512(const uint8_t* row, int64_t b, float row_scale,
                                          __m512* w) {
  if constexpr (F == kQ8_0 || F == kI8) {
    const uint8_t* q = F == kQ8_0 ? row + b * 34 + 2 : row + b * 32;
    const __m512 d = _mm512_set1_ps(F == kQ8_0 ? LoadHalfF16c(row + b * 34) : row_scale);
    for (int j = 0; j < 2; ++j)
      w[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * j)))), d);
  } else {
    constexpr bool kHasMin = F == kQ4_1;
    const uint8_t* blk = row + b * (kHasMin ? 20 : 18);
    const float df = LoadHalfF16c(blk);
    const __m512 d = _mm512_set1_ps(df);
    const __m512 bias = _mm512_set1_ps(kHasMin ? LoadHalfF16c(blk + 2) : -8.0f * df);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (kHasMin ? 4 : 2)));
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(q, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), low_mask);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, bias);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, bias);
  }
}

// y[r * ldy] = row . x[r] for R (1..8) rows of x (2R accumulators: up to 16 of the 32 registers);
// for R <= 2 even and odd blocks go to two sets of accumulators, so every tile has at least 4
// independent FMA chains.
template <int64_t F, int R>
SPECJAX_AVX512 void FusedTile512(const uint8_t* row, int64_t k, float row_scale, const float* x,
                                 int64_t ldx, float* y, int64_t ldy) {
  constexpr int S = R <= 2 ? 2 : 1;  // accumulator sets (blocks per step)
  __m512 acc[S][R][2];
  for (int t = 0; t < S; ++t)
    for (int r = 0; r < R; ++r) acc[t][r][0] = acc[t][r][1] = _mm512_setzero_ps();
  const int64_t nb = k / 32;
  auto block = [&](int64_t b, int t) SPECJAX_AVX512 {
    __m512 w[2];
    BlockValues512<F>(row, b, row_scale, w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * 32;
      acc[t][r][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), acc[t][r][0]);
      acc[t][r][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16), acc[t][r][1]);
    }
  };
  int64_t b = 0;
  for (; b + S <= nb; b += S)
    for (int t = 0; t < S; ++t) block(b + t, t);
  for (; b < nb; ++b) block(b, 0);
  for (int r = 0; r < R; ++r) {
    __m512 total = _mm512_add_ps(acc[0][r][0], acc[0][r][1]);
    for (int t = 1; t < S; ++t)
      total = _mm512_add_ps(total, _mm512_add_ps(acc[t][r][0], acc[t][r][1]));
    y[r * ldy] = _mm512_reduce_add_ps(total);
  }
}

template <int64_t F>
SPECJAX_AVX512 void FusedRows512(const uint8_t* row, int64_t k, float row_scale, const float* x,
                                 int64_t m, float* y, int64_t ldy) {
  ForRowTiles<8>(m, [&](auto rows, int64_t r) SPECJAX_AVX512 {
    FusedTile512<F, decltype(rows)::value>(row, k, row_scale, x + r * k, k, y + r * ldy, ldy);
  });
}

SPECJAX_AVX512 bool FusedRow512(int64_t fmt, const uint8_t* row, int64_t k, float row_scale,
                                const float* x, int64_t m, float* y, int64_t ldy) {
  return ForFusedFormat(fmt, k, [&](auto f) SPECJAX_AVX512 {
    FusedRows512<decltype(f)::value>(row, k, row_scale, x, m, y, ldy);
  });
}
#endif  // SPECJAX_X86

// ---- 8-bit activations --------------------------------------------------------------------

// x [M, K] quantised per 32-value block: q [M, K] int8, d [M, K/32] (the block's scale) and
// s [M, K/32] = d * sum(q) (the block's sum, for the weights' min term).
struct Act8 {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

void QuantizeActivations(const float* x, int64_t m, int64_t k, Act8* a) {
  const int64_t nb = k / 32;
  a->q.resize(m * k);
  a->d.resize(m * nb);
  a->s.resize(m * nb);
  for (int64_t i = 0; i < m * nb; ++i) {
    const float* xb = x + i * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax * (1.0f / 127.0f);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      // Round half to even (the default rounding mode), as jnp.round does: adding and
      // subtracting 1.5 * 2^23 rounds any |v| <= 2^22 to an integer in that mode, inline.
      const float magic = 12582912.0f;
      const float v = xb[j] * id;
      const int32_t q = static_cast<int32_t>((v + magic) - magic);
      a->q[i * 32 + j] = static_cast<int8_t>(q);
      sum += q;
    }
    a->d[i] = d;
    a->s[i] = d * static_cast<float>(sum);
  }
}

// Scale and min of block b of a Q8_0 / Q4_0 / Q4_1 row as (d_w, m_w) with w = d_w * qw + m_w,
// qw the block's unsigned nibbles (Q4_*) or signed bytes (Q8_0).
template <int64_t F>
inline void BlockScaleMin(const uint8_t* blk, float* d, float* m) {
  *d = LoadHalf(blk);
  if constexpr (F == kQ4_1) *m = LoadHalf(blk + 2);
  else if constexpr (F == kQ4_0) *m = -8.0f * *d;
  else *m = 0.0f;
}

template <int64_t F>
constexpr int64_t BlockBytesOf() { return F == kQ8_0 ? 34 : (F == kQ4_1 ? 20 : 18); }

// Portable: y[r * ldy] = row . x[r] for every row r of the quantised activations.
template <int64_t F>
void Act8RowPortable(const uint8_t* row, int64_t k, const Act8& a, int64_t m, float* y,
                     int64_t ldy) {
  const int64_t nb = k / 32;
  for (int64_t r = 0; r < m; ++r) {
    const int8_t* xq = a.q.data() + r * k;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BlockBytesOf<F>();
      float dw, mw;
      BlockScaleMin<F>(blk, &dw, &mw);
      const int8_t* xb = xq + b * 32;
      int32_t sum = 0;
      if constexpr (F == kQ8_0) {
        const int8_t* qw = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < 32; ++j) sum += qw[j] * xb[j];
      } else {
        const uint8_t* qs = blk + (F == kQ4_1 ? 4 : 2);
        for (int j = 0; j < 16; ++j) sum += (qs[j] & 0x0F) * xb[j] + (qs[j] >> 4) * xb[j + 16];
      }
      acc += dw * a.d[r * nb + b] * static_cast<float>(sum) + mw * a.s[r * nb + b];
    }
    y[r * ldy] = acc;
  }
}

#if SPECJAX_X86
// One block b of the row into acc[r] for R rows of x; returns the block's m_w (its min term is
// added after the loop, as a dot product of the row's m_w with the rows' block sums).
template <int64_t F, int R>
SPECJAX_AVX2 inline float Act8Block(const uint8_t* row, int64_t b, int64_t k, int64_t nb,
                                    const int8_t* xq, const float* xd, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* blk = row + b * BlockBytesOf<F>();
  const float dwf = LoadHalfF16c(blk);
  const __m256 dw = _mm256_set1_ps(dwf);
  __m256i qw, signs;
  float mw = 0.0f;
  if constexpr (F == kQ8_0) {
    signs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    qw = _mm256_sign_epi8(signs, signs);
  } else {
    mw = F == kQ4_1 ? LoadHalfF16c(blk + 2) : -8.0f * dwf;
    const __m128i q =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (F == kQ4_1 ? 4 : 2)));
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    qw = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low_mask),
                          _mm_and_si128(q, low_mask));
  }
  for (int r = 0; r < R; ++r) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * 32));
    if constexpr (F == kQ8_0) xv = _mm256_sign_epi8(xv, signs);
    const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, xv), ones);
    const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums),
                                        _mm256_broadcast_ss(xd + r * nb + b));
    acc[r] = _mm256_fmadd_ps(scaled, dw, acc[r]);
  }
  return mw;
}

// AVX2: a weight block's 32 quants in one register (unsigned; Q8_0 as |qw| with the signs moved
// onto x), `vpmaddubsw` + `vpmaddwd` give 8 int32 partial sums per activation row, converted and
// scaled into float accumulators. R (1..4) rows of x per pass; even and odd blocks go to two
// sets of accumulators (independent FMA chains), all held in registers. `mins` is scratch for
// the row's block mins (nb floats).
template <int64_t F, int R>
SPECJAX_AVX2 void Act8Tile(const uint8_t* row, int64_t k, const int8_t* xq, const float* xd,
                           const float* xs, float* mins, float* y, int64_t ldy) {
  const int64_t nb = k / 32;
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    mins[b] = Act8Block<F, R>(row, b, k, nb, xq, xd, acc0);
    mins[b + 1] = Act8Block<F, R>(row, b + 1, k, nb, xq, xd, acc1);
  }
  if (b < nb) mins[b] = Act8Block<F, R>(row, b, k, nb, xq, xd, acc0);
  for (int r = 0; r < R; ++r) {
    float min_term = 0.0f;
    if constexpr (F != kQ8_0) {
      __m256 m_acc = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= nb; j += 8)
        m_acc = _mm256_fmadd_ps(_mm256_loadu_ps(mins + j), _mm256_loadu_ps(xs + r * nb + j),
                                m_acc);
      min_term = HorizontalSum(m_acc);
      for (; j < nb; ++j) min_term += mins[j] * xs[r * nb + j];
    }
    y[r * ldy] = HorizontalSum(_mm256_add_ps(acc0[r], acc1[r])) + min_term;
  }
}

template <int64_t F>
SPECJAX_AVX2 void Act8RowsAvx2(const uint8_t* row, int64_t k, const Act8& a, int64_t m,
                               float* y, int64_t ldy) {
  const int64_t nb = k / 32;
  const int8_t* xq = a.q.data();
  const float* xd = a.d.data();
  const float* xs = a.s.data();
  thread_local std::vector<float> mins;
  if (static_cast<int64_t>(mins.size()) < nb) mins.resize(nb);
  float* mn = mins.data();
  ForRowTiles<4>(m, [&](auto rows, int64_t r) SPECJAX_AVX2 {
    Act8Tile<F, decltype(rows)::value>(row, k, xq + r * k, xd + r * nb, xs + r * nb, mn,
                                       y + r * ldy, ldy);
  });
}
#endif  // SPECJAX_X86

void Act8Row(int64_t fmt, bool avx2, const uint8_t* row, int64_t k, const Act8& a, int64_t m,
             float* y, int64_t ldy) {
  auto rows = [&](auto f) {
    constexpr int64_t F = decltype(f)::value;
#if SPECJAX_X86
    if (avx2) return Act8RowsAvx2<F>(row, k, a, m, y, ldy);
#endif
    Act8RowPortable<F>(row, k, a, m, y, ldy);
  };
  switch (fmt) {  // the caller checked fmt: Q8_0, Q4_0 or Q4_1
    case kQ8_0: rows(std::integral_constant<int64_t, kQ8_0>()); return;
    case kQ4_0: rows(std::integral_constant<int64_t, kQ4_0>()); return;
    default: rows(std::integral_constant<int64_t, kQ4_1>()); return;
  }
}

bool HasAvx512() {
#if SPECJAX_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool HasAvx2Fma() {
#if SPECJAX_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The instruction set this CPU takes (checked once per process): kIsaAvx512, kIsaAvx2 or
// kIsaPortable; a call's `isa` attribute can cap it (tests run every path the CPU has).
enum Isa : int64_t { kIsaAuto = 0, kIsaPortable = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

int64_t BestIsa() {
  static const int64_t best = HasAvx512() ? kIsaAvx512 : (HasAvx2Fma() ? kIsaAvx2 : kIsaPortable);
  return best;
}

// Dequantises row n of W (format fmt) into buf[K]; returns the pointer to read (for F32 the row
// itself, no copy).
const float* DequantRow(int64_t fmt, const uint8_t* row, int64_t k, float scale, bool avx2,
                        float* buf) {
  switch (fmt) {
    case kF32: return reinterpret_cast<const float*>(row);
    // On the AVX2 path Q8_0 / Q4_0 / Q4_1 always take the fused path (K is a multiple of 32),
    // and I8 does too unless K is not: only I8 needs an AVX2 buffer dequantiser.
    case kQ8_0: DequantQ8_0(row, k, buf); return buf;
    case kQ4_0: DequantQ4_0(row, k, buf); return buf;
    case kQ4_1: DequantQ4_1(row, k, buf); return buf;
#if SPECJAX_X86
    case kI8: avx2 ? DequantI8Avx2(row, k, scale, buf) : DequantI8(row, k, scale, buf);
      return buf;
#else
    case kI8: DequantI8(row, k, scale, buf); return buf;
#endif
    case kQ4_K: DequantQ4_K(row, k, buf); return buf;
    case kQ6_K: DequantQ6_K(row, k, buf); return buf;
    case kQ5_0: DequantQ5_0(row, k, buf); return buf;
    default: return nullptr;
  }
}

struct Problem {
  const float* x;        // [M, K]
  const uint8_t* w;      // [N, row_bytes]
  const float* scale;    // [N] (I8) or unused
  float* y;              // [M, N]
  int64_t m, n, k, row_bytes, fmt;
  bool avx2;             // AVX2 + FMA (also true on the AVX-512 path)
  bool avx512;
  const Act8* act8;      // the quantised x (8-bit activations), or null
};

// Output rows [begin, end) of the problem.
void RunRows(const Problem& p, int64_t begin, int64_t end) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < p.k) buf.resize(p.k);
  if (p.act8 != nullptr) {
    for (int64_t n = begin; n < end; ++n)
      Act8Row(p.fmt, p.avx2, p.w + n * p.row_bytes, p.k, *p.act8, p.m, p.y + n, p.n);
    return;
  }
  for (int64_t n = begin; n < end; ++n) {
#if SPECJAX_X86
    if (p.avx512 && FusedRow512(p.fmt, p.w + n * p.row_bytes, p.k,
                                p.fmt == kI8 ? p.scale[n] : 1.0f, p.x, p.m, p.y + n, p.n))
      continue;
    if (p.avx2 && FusedRow(p.fmt, p.w + n * p.row_bytes, p.k, p.fmt == kI8 ? p.scale[n] : 1.0f,
                           p.x, p.m, p.y + n, p.n))
      continue;
#endif
    const float* w = DequantRow(p.fmt, p.w + n * p.row_bytes, p.k,
                                p.fmt == kI8 ? p.scale[n] : 1.0f, p.avx2, buf.data());
#if SPECJAX_X86
    if (p.avx2) {
      DotRowsAvx2(w, p.x, p.k, p.k, p.m, p.y + n, p.n);
      continue;
    }
#endif
    DotRowsPortable(w, p.x, p.k, p.k, p.m, p.y + n, p.n);
  }
}

// Work shared by the caller and the tasks it schedules: chunks of output rows claimed with an
// atomic counter, so a task that starts late finds nothing left and returns (it keeps this state
// alive through its shared_ptr), and the caller never waits for a task that has not started.
struct SharedWork {
  Problem problem;
  Act8 act8;
  int64_t chunk_rows, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      const int64_t begin = c * chunk_rows;
      RunRows(problem, begin, std::min(problem.n, begin + chunk_rows));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer,
                        ffi::ResultBuffer<ffi::F32> y, int64_t fmt,
                        int64_t k, int64_t n, int64_t num_layers, int64_t max_threads,
                        int64_t isa, int64_t act8) {
  if (fmt < 0 || fmt >= kNumFormats)
    return ffi::Error::InvalidArgument("packed_matmul: unknown weight format");
  if (k <= 0 || n <= 0 || k % kBlockValues[fmt] != 0)
    return ffi::Error::InvalidArgument("packed_matmul: K must be a positive multiple of the "
                                       "format's block size");
  const int64_t row_bytes = k / kBlockValues[fmt] * kBlockBytes[fmt];
  const int64_t x_size = static_cast<int64_t>(x.element_count());
  if (x_size % k != 0)
    return ffi::Error::InvalidArgument("packed_matmul: x's size is not a multiple of K");
  const int64_t m = x_size / k;
  // W is one weight [N, R] (num_layers = 1) or a stack [L, N, R] read at layer `layer` in
  // place; a W batched under vmap has more bytes than the caller declared.
  if (num_layers < 1 ||
      static_cast<int64_t>(w.element_count()) != num_layers * n * row_bytes)
    return ffi::Error::InvalidArgument("packed_matmul: W's byte count does not match N rows of "
                                       "the format (a batched W is not supported)");
  if (layer.element_count() != 1)
    return ffi::Error::InvalidArgument("packed_matmul: the layer index must be one int32");
  const int64_t index = layer.typed_data()[0];
  if (index < 0 || index >= num_layers)
    return ffi::Error::InvalidArgument("packed_matmul: the layer index is outside the stack");
  if (static_cast<int64_t>(y->element_count()) != m * n)
    return ffi::Error::InvalidArgument("packed_matmul: y's size is not M * N");
  const int64_t scale_count = static_cast<int64_t>(scale.element_count());
  if (scale_count % num_layers != 0 ||
      (fmt == kI8 && scale_count != num_layers * n))
    return ffi::Error::InvalidArgument("packed_matmul: the scales do not fit W (I8 takes one "
                                       "per output row)");
  const uint8_t* w_layer = w.typed_data() + index * n * row_bytes;
  const float* scale_layer = scale.typed_data() + index * (scale_count / num_layers);
  if (isa < kIsaAuto || isa > kIsaAvx512)
    return ffi::Error::InvalidArgument("packed_matmul: isa must be 0 (auto), 1 (portable), "
                                       "2 (AVX2) or 3 (AVX-512)");
  if (act8 != 0 && fmt != kQ8_0 && fmt != kQ4_0 && fmt != kQ4_1)
    return ffi::Error::InvalidArgument("packed_matmul: 8-bit activations take Q8_0, Q4_0 or "
                                       "Q4_1 weights");
  if (m == 0) return ffi::Error::Success();

  auto work = std::make_shared<SharedWork>();
  work->problem = Problem{x.typed_data(), w_layer, scale_layer,
                          y->typed_data(), m, n, k, row_bytes, fmt, false, false, nullptr};
  const int64_t use = isa == kIsaAuto ? BestIsa() : std::min(isa, BestIsa());
  work->problem.avx2 = use >= kIsaAvx2;
  work->problem.avx512 = use >= kIsaAvx512;
  if (act8 != 0) {
    QuantizeActivations(x.typed_data(), m, k, &work->act8);
    work->problem.act8 = &work->act8;
  }
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  // About four chunks per thread balance the load; each chunk keeps >= 16 rows.
  const int64_t chunks = std::max<int64_t>(1, std::min(threads * 4, n / 16));
  work->chunk_rows = (n + chunks - 1) / chunks;
  work->num_chunks = (n + work->chunk_rows - 1) / work->chunk_rows;
  const int64_t helpers = std::min(threads, work->num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) {
#if SPECJAX_X86
    _mm_pause();
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace specjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxPackedMatmul, specjax::PackedMatmul,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [..., K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // W [(L,) N, R]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // scale [(L,) N|1]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // layer index
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // y [..., N]
                                  .Attr<int64_t>("fmt")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("num_layers")
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("act8"));

// The best code path of this CPU: 3 = AVX-512, 2 = AVX2 + FMA, 1 = portable.
extern "C" int SpecjaxPackedMatmulPath() { return static_cast<int>(specjax::BestIsa()); }
