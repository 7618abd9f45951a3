// CPU Adam (decoupled weight decay) for bmt-optim's offload optimizer.
//
// One call updates a contiguous run of n elements: the fp32 master copy, the fp32 moments, and
// optionally writes the new parameter in fp32/fp16/bf16. The gradient may be fp32/fp16/bf16; it
// is multiplied by `grad_mul` (= +-1/loss_scale) on the fly. Everything is raw pointers and
// sizes: this module links neither torch nor CUDA, so no ABI can drift.
//
// With a statistics buffer the call also adds up, in double, the sum and the sum of squares of
// the update direction d = m_hat / (sqrt(v_hat) + eps) + weight_decay * p (p before the update):
// the offload optimizer's record_delta. Each task sums its own range and the tasks' sums are added
// in task order, so for a given thread count the result does not depend on which thread ran what.
//
// SIMD variants (AVX-512, AVX2+FMA+F16C, portable scalar) are compiled with function-level target
// attributes and picked at run time with __builtin_cpu_supports: the binary runs on any x86-64
// (and the scalar path on any CPU). Work is split over a small persistent thread pool.
//
// The arithmetic follows torch.optim.AdamW's single-tensor path, in this order:
//   g = grad * grad_mul;  p = p * decay;  m = fma(1 - beta1, g - m, m)         (torch's lerp)
//   v = fma((1 - beta2) * g, g, v * beta2)                                       (torch's addcmul)
//   p = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps)                        (torch's addcdiv)
// each operation rounded as torch's CPU kernels round it, so the results agree to the last bit
// in most elements (and to an ulp in the others).
//
// The division by the constant bc2_sqrt is not a divide instruction: q = s * y with y = 1/bc2_sqrt
// rounded to float, then one Markstein correction q += (s - q * bc2_sqrt) * y in FMAs. With y
// correctly rounded and q within an ulp, that result is the correctly rounded quotient
// (Markstein's theorem), bit for bit what a divide gives, and it frees the divider, which sqrt
// and the remaining divide share: 1.67 -> 2.42 G elem/s per core in cache (AVX-512, 2-core VM).

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define BMT_X86 1
#include <immintrin.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <unistd.h>
#endif

namespace py = pybind11;

namespace {

// Element types, matching bmt_optim.cpu_adam.Dtype.
enum class Dtype : int { F32 = 0, F16 = 1, BF16 = 2 };

struct Hyper {
  float decay;            // 1 - lr * weight_decay
  float one_minus_beta1;  // 1 - beta1
  float beta2;
  float one_minus_beta2;  // 1 - beta2
  float eps;
  float step_size;        // lr / (1 - beta1^t)
  float bc2_sqrt;         // sqrt(1 - beta2^t)
  float grad_mul;         // (+-1) / loss_scale
  float inv_bc2_sqrt;     // 1 / bc2_sqrt rounded to float (the Markstein reciprocal)
  float inv_bc1;          // 1 / (1 - beta1^t): for the statistics only
  float weight_decay;     // for the statistics only
};

// Sum and sum of squares of the update direction over a range (record_delta).
struct Stats {
  double sum = 0.0;
  double sum_sq = 0.0;
  void add(float d) {
    sum += d;
    sum_sq += static_cast<double>(d) * d;
  }
};

struct Job {
  const float* master;
  const float* exp_avg;
  const float* exp_avg_sq;
  // where the new master and moments go: the inputs themselves (in place), or other memory
  // (out of place: the inputs are left as they were, so an update can be dropped unseen)
  float* master_out;
  float* exp_avg_out;
  float* exp_avg_sq_out;
  const void* grad;
  Dtype grad_dtype;
  void* out;  // nullptr: no low-precision output
  Dtype out_dtype;
  Hyper h;
};

// ---------------------------------------------------------------- portable scalar conversions
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN -> canonical quiet NaN
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float, exact and round-to-nearest-even (the FP16 library's bit tricks).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = bits_f32(0x7800000u);  // 2^-112
  const float normalized = bits_f32((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_f32((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_bits(denormalized) : f32_bits(normalized));
  return bits_f32(result);
}

inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = bits_f32(0x77800000u);   // 2^112
  const float scale_to_zero = bits_f32(0x08800000u);  // 2^-110
  float base = (f < 0 ? -f : f) * scale_to_inf;
  base *= scale_to_zero;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float load_scalar(const void* p, Dtype d, int64_t i) {
  switch (d) {
    case Dtype::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case Dtype::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_scalar(void* p, Dtype d, int64_t i, float x) {
  switch (d) {
    case Dtype::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(x); break;
    case Dtype::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(x); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

// s / bc2_sqrt, correctly rounded, without a divide (see the top of the file). A non-finite q
// (s infinite, or the product overflowing) makes the correction NaN: keep q, which is then the
// quotient's own value (inf, or NaN for NaN).
inline float div_bc2(float s, const Hyper& h) {
  const float q = s * h.inv_bc2_sqrt;
  const float r = std::fma(-q, h.bc2_sqrt, s);
  const float q1 = std::fma(r, h.inv_bc2_sqrt, q);
  return std::isnan(q1) ? q : q1;
}

template <bool kStats>
void adam_scalar_impl(const Job& j, int64_t begin, int64_t end, Stats* stats) {
  const Hyper& h = j.h;
  for (int64_t i = begin; i < end; ++i) {
    const float g = load_scalar(j.grad, j.grad_dtype, i) * h.grad_mul;
    const float p_old = j.master[i];
    float p = p_old * h.decay;
    float m = j.exp_avg[i];
    m = std::fma(h.one_minus_beta1, g - m, m);
    const float v = std::fma(h.one_minus_beta2 * g, g, j.exp_avg_sq[i] * h.beta2);
    const float denom = div_bc2(std::sqrt(v), h) + h.eps;
    if constexpr (kStats) stats->add(std::fma(h.weight_decay, p_old, (m * h.inv_bc1) / denom));
    p = p - (h.step_size * m) / denom;
    j.master_out[i] = p;
    j.exp_avg_out[i] = m;
    j.exp_avg_sq_out[i] = v;
    if (j.out) store_scalar(j.out, j.out_dtype, i, p);
  }
}

void adam_scalar(const Job& j, int64_t begin, int64_t end, Stats* stats) {
  if (stats) adam_scalar_impl<true>(j, begin, end, stats);
  else adam_scalar_impl<false>(j, begin, end, nullptr);
}

#ifdef BMT_X86
// ---------------------------------------------------------------- AVX2 + FMA + F16C (8 lanes)
#define BMT_AVX2 __attribute__((target("avx2,fma,f16c")))

BMT_AVX2 inline __m256 avx2_load(const void* p, Dtype d, int64_t i) {
  switch (d) {
    case Dtype::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    case Dtype::BF16: {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

BMT_AVX2 inline void avx2_store(void* p, Dtype d, int64_t i, __m256 x) {
  switch (d) {
    case Dtype::F16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                       _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case Dtype::BF16: {
      const __m256i u = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), packed);
      break;
    }
    default: _mm256_storeu_ps(static_cast<float*>(p) + i, x);
  }
}

BMT_AVX2 inline __m256 avx2_div_bc2(__m256 s, const Hyper& h) {  // as div_bc2
  const __m256 y = _mm256_set1_ps(h.inv_bc2_sqrt);
  const __m256 q = _mm256_mul_ps(s, y);
  const __m256 q1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, _mm256_set1_ps(h.bc2_sqrt), s), y, q);
  return _mm256_blendv_ps(q1, q, _mm256_cmp_ps(q1, q1, _CMP_UNORD_Q));
}

// Returns the update direction when kStats (else nothing worth reading).
template <bool kStats>
BMT_AVX2 inline __m256 avx2_body(const float* master, const float* ea, const float* eas, float* master_o, float* ea_o,
                                 float* eas_o, const void* grad, Dtype gd, void* out,
                                 Dtype od, int64_t i, const Hyper& h) {
  const __m256 g = _mm256_mul_ps(avx2_load(grad, gd, i), _mm256_set1_ps(h.grad_mul));
  const __m256 p_old = _mm256_loadu_ps(master + i);
  const __m256 p0 = _mm256_mul_ps(p_old, _mm256_set1_ps(h.decay));
  __m256 m = _mm256_loadu_ps(ea + i);
  m = _mm256_fmadd_ps(_mm256_set1_ps(h.one_minus_beta1), _mm256_sub_ps(g, m), m);
  __m256 v = _mm256_loadu_ps(eas + i);
  v = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(h.one_minus_beta2), g), g, _mm256_mul_ps(v, _mm256_set1_ps(h.beta2)));
  const __m256 denom = _mm256_add_ps(avx2_div_bc2(_mm256_sqrt_ps(v), h), _mm256_set1_ps(h.eps));
  const __m256 p = _mm256_sub_ps(p0, _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(h.step_size), m), denom));
  _mm256_storeu_ps(master_o + i, p);
  _mm256_storeu_ps(ea_o + i, m);
  _mm256_storeu_ps(eas_o + i, v);
  if (out) avx2_store(out, od, i, p);
  if constexpr (kStats)
    return _mm256_fmadd_ps(_mm256_set1_ps(h.weight_decay), p_old,
                           _mm256_div_ps(_mm256_mul_ps(m, _mm256_set1_ps(h.inv_bc1)), denom));
  return p;
}

// Tails go through the same vector body on a zero-padded copy, so every element is computed by
// identical instructions whatever its position.
struct Tail {
  alignas(64) float master[16];
  alignas(64) float exp_avg[16];
  alignas(64) float exp_avg_sq[16];
  alignas(64) float grad[16];  // room for 16 elements of any type
  alignas(64) float out[16];
};

inline size_t dtype_size(Dtype d) { return d == Dtype::F32 ? 4 : 2; }

inline void tail_load(const Job& j, int64_t i, int64_t r, Tail& t) {
  std::memset(&t, 0, sizeof(t));
  std::memcpy(t.master, j.master + i, r * 4);
  std::memcpy(t.exp_avg, j.exp_avg + i, r * 4);
  std::memcpy(t.exp_avg_sq, j.exp_avg_sq + i, r * 4);
  const size_t gs = dtype_size(j.grad_dtype);
  std::memcpy(t.grad, static_cast<const char*>(j.grad) + i * gs, r * gs);
}

inline void tail_store(const Job& j, int64_t i, int64_t r, const Tail& t) {
  std::memcpy(j.master_out + i, t.master, r * 4);
  std::memcpy(j.exp_avg_out + i, t.exp_avg, r * 4);
  std::memcpy(j.exp_avg_sq_out + i, t.exp_avg_sq, r * 4);
  const size_t os = dtype_size(j.out_dtype);
  if (j.out) std::memcpy(static_cast<char*>(j.out) + i * os, t.out, r * os);
}

template <bool kStats>
BMT_AVX2 void adam_avx2_impl(const Job& j, int64_t begin, int64_t end, Stats* stats) {
  __m256d sum = _mm256_setzero_pd(), sum_sq = _mm256_setzero_pd();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 d = avx2_body<kStats>(j.master, j.exp_avg, j.exp_avg_sq, j.master_out, j.exp_avg_out, j.exp_avg_sq_out,
                                         j.grad, j.grad_dtype, j.out, j.out_dtype, i, j.h);
    if constexpr (kStats) {
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
      sum = _mm256_add_pd(sum, _mm256_add_pd(lo, hi));
      sum_sq = _mm256_fmadd_pd(lo, lo, _mm256_fmadd_pd(hi, hi, sum_sq));
    }
  }
  if constexpr (kStats) {
    alignas(32) double a[4], b[4];
    _mm256_store_pd(a, sum);
    _mm256_store_pd(b, sum_sq);
    stats->sum += (a[0] + a[1]) + (a[2] + a[3]);
    stats->sum_sq += (b[0] + b[1]) + (b[2] + b[3]);
  }
  if (i < end) {
    Tail t;
    tail_load(j, i, end - i, t);
    alignas(32) float d[8];
    _mm256_store_ps(d, avx2_body<kStats>(t.master, t.exp_avg, t.exp_avg_sq, t.master, t.exp_avg, t.exp_avg_sq, t.grad, j.grad_dtype,
                                         j.out ? t.out : nullptr, j.out_dtype, 0, j.h));
    tail_store(j, i, end - i, t);
    if constexpr (kStats)
      for (int64_t k = 0; k < end - i; ++k) stats->add(d[k]);  // the padding lanes are not counted
  }
}

BMT_AVX2 void adam_avx2(const Job& j, int64_t begin, int64_t end, Stats* stats) {
  if (stats) adam_avx2_impl<true>(j, begin, end, stats);
  else adam_avx2_impl<false>(j, begin, end, nullptr);
}

// ---------------------------------------------------------------- AVX-512 (16 lanes)
#define BMT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

BMT_AVX512 inline __m512 avx512_load(const void* p, Dtype d, int64_t i) {
  switch (d) {
    case Dtype::F16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    case Dtype::BF16: {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  }
}

BMT_AVX512 inline void avx512_store(void* p, Dtype d, int64_t i, __m512 x) {
  switch (d) {
    case Dtype::F16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i),
                          _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case Dtype::BF16: {
      const __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), _mm512_cvtepi32_epi16(r));
      break;
    }
    default: _mm512_storeu_ps(static_cast<float*>(p) + i, x);
  }
}

BMT_AVX512 inline __m512 avx512_div_bc2(__m512 s, const Hyper& h) {  // as div_bc2
  const __m512 y = _mm512_set1_ps(h.inv_bc2_sqrt);
  const __m512 q = _mm512_mul_ps(s, y);
  const __m512 q1 = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, _mm512_set1_ps(h.bc2_sqrt), s), y, q);
  return _mm512_mask_mov_ps(q1, _mm512_cmp_ps_mask(q1, q1, _CMP_UNORD_Q), q);
}

// Returns the update direction when kStats (else nothing worth reading).
template <bool kStats>
BMT_AVX512 inline __m512 avx512_body(const float* master, const float* ea, const float* eas, float* master_o, float* ea_o,
                                     float* eas_o, const void* grad, Dtype gd, void* out,
                                     Dtype od, int64_t i, const Hyper& h) {
  const __m512 g = _mm512_mul_ps(avx512_load(grad, gd, i), _mm512_set1_ps(h.grad_mul));
  const __m512 p_old = _mm512_loadu_ps(master + i);
  const __m512 p0 = _mm512_mul_ps(p_old, _mm512_set1_ps(h.decay));
  __m512 m = _mm512_loadu_ps(ea + i);
  m = _mm512_fmadd_ps(_mm512_set1_ps(h.one_minus_beta1), _mm512_sub_ps(g, m), m);
  __m512 v = _mm512_loadu_ps(eas + i);
  v = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(h.one_minus_beta2), g), g, _mm512_mul_ps(v, _mm512_set1_ps(h.beta2)));
  const __m512 denom = _mm512_add_ps(avx512_div_bc2(_mm512_sqrt_ps(v), h), _mm512_set1_ps(h.eps));
  const __m512 p = _mm512_sub_ps(p0, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(h.step_size), m), denom));
  _mm512_storeu_ps(master_o + i, p);
  _mm512_storeu_ps(ea_o + i, m);
  _mm512_storeu_ps(eas_o + i, v);
  if (out) avx512_store(out, od, i, p);
  if constexpr (kStats)
    return _mm512_fmadd_ps(_mm512_set1_ps(h.weight_decay), p_old,
                           _mm512_div_ps(_mm512_mul_ps(m, _mm512_set1_ps(h.inv_bc1)), denom));
  return p;
}

template <bool kStats>
BMT_AVX512 void adam_avx512_impl(const Job& j, int64_t begin, int64_t end, Stats* stats) {
  __m512d sum = _mm512_setzero_pd(), sum_sq = _mm512_setzero_pd();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 d = avx512_body<kStats>(j.master, j.exp_avg, j.exp_avg_sq, j.master_out, j.exp_avg_out, j.exp_avg_sq_out,
                                             j.grad, j.grad_dtype, j.out, j.out_dtype, i, j.h);
    if constexpr (kStats) {
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
      sum = _mm512_add_pd(sum, _mm512_add_pd(lo, hi));
      sum_sq = _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, sum_sq));
    }
  }
  if constexpr (kStats) {
    stats->sum += _mm512_reduce_add_pd(sum);
    stats->sum_sq += _mm512_reduce_add_pd(sum_sq);
  }
  if (i < end) {
    Tail t;
    tail_load(j, i, end - i, t);
    alignas(64) float d[16];
    _mm512_store_ps(d, avx512_body<kStats>(t.master, t.exp_avg, t.exp_avg_sq, t.master, t.exp_avg, t.exp_avg_sq, t.grad,
                                           j.grad_dtype,
                                           j.out ? t.out : nullptr, j.out_dtype, 0, j.h));
    tail_store(j, i, end - i, t);
    if constexpr (kStats)
      for (int64_t k = 0; k < end - i; ++k) stats->add(d[k]);  // the padding lanes are not counted
  }
}

BMT_AVX512 void adam_avx512(const Job& j, int64_t begin, int64_t end, Stats* stats) {
  if (stats) adam_avx512_impl<true>(j, begin, end, stats);
  else adam_avx512_impl<false>(j, begin, end, nullptr);
}
#endif  // BMT_X86

// ---------------------------------------------------------------- run-time dispatch
enum class Simd : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Simd detect_simd() {
#ifdef BMT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Simd::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Simd::Avx2;
#endif
  return Simd::Scalar;
}

const Simd kBestSimd = detect_simd();
std::atomic<int> g_simd{static_cast<int>(kBestSimd)};  // tests may force a lower level

using KernelFn = void (*)(const Job&, int64_t, int64_t, Stats*);  // Stats: nullptr when not recorded

KernelFn kernel_for(Simd s) {
#ifdef BMT_X86
  if (s == Simd::Avx512) return adam_avx512;
  if (s == Simd::Avx2) return adam_avx2;
#endif
  (void)s;
  return adam_scalar;
}

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::Avx512: return "avx512";
    case Simd::Avx2: return "avx2";
    default: return "scalar";
  }
}

// ---------------------------------------------------------------- thread pool
// The caller and `threads - 1` workers claim tasks from a shared counter until none is left, so a
// thread the OS deschedules (other processes on the host) delays only the tasks it holds.
// One run at a time (callers serialise on g_run_mu).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  explicit Pool(int workers) : spin_(workers <= kSpinMaxWorkers) {
    for (int i = 1; i <= workers; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      stop_flag_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int workers() const { return static_cast<int>(threads_.size()); }

  // Runs fn(0..ntasks-1) on the caller and workers 1..threads-1.
  void run(int threads, int64_t ntasks, const std::function<void(int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      threads_in_run_ = threads;
      pending_.store(threads - 1);
      ++generation_;
      published_.store(generation_, std::memory_order_release);
    }
    cv_.notify_all();
    drain(fn);
    // the workers usually finish within microseconds of the caller: spin briefly before sleeping
    if (!(spin_ && spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; }))) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [this] { return pending_.load() == 0; });
    }
    std::lock_guard<std::mutex> lk(mu_);
    job_ = nullptr;
  }

 private:
  void drain(const std::function<void(int64_t)>& fn) {
    for (int64_t t = next_.fetch_add(1); t < ntasks_; t = next_.fetch_add(1)) fn(t);
  }

  // Spin for up to kSpin on `ready` (cheap when calls come back to back, as an optimizer step's
  // chunks do: a sleeping worker takes tens of microseconds to wake, as long as a small task).
  template <typename F>
  static bool spin_until(F ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      if (ready()) return true;
      cpu_relax();  // leaves the core's resources to a hyper-thread sibling still computing
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return false;
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      if (spin_) spin_until([&] { return published_.load(std::memory_order_acquire) != seen || stop_flag_.load(); });
      const std::function<void(int64_t)>* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index >= threads_in_run_) continue;
        job = job_;
      }
      drain(*job);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller may be about to sleep: wake it under the lock
        done_cv_.notify_one();
      }
    }
  }

  static constexpr std::chrono::microseconds kSpin{100};
  // Spinning pays on small machines (2 cores: 1.4 -> 2.3 G elem/s in cache) but on a 64-thread
  // H100 host it slowed each 16M-element offload chunk by a third (spinning siblings of threads
  // still computing), so big pools sleep at once.
  static constexpr int kSpinMaxWorkers = 8;
  const bool spin_;

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  int threads_in_run_ = 0;
  std::atomic<int> pending_{0};              // workers still draining this run
  uint64_t generation_ = 0;                  // guarded by mu_
  std::atomic<uint64_t> published_{0};       // generation_, readable without the lock (for spinning)
  std::atomic<bool> stop_flag_{false};       // stop_, readable without the lock
  bool stop_ = false;
};

std::mutex g_run_mu;     // serialises calls (the GIL is released while they run)
Pool* g_pool = nullptr;  // leaked on purpose at exit: joining threads during interpreter teardown can hang

#if defined(__unix__) || defined(__APPLE__)
// A forked child has no worker threads: forget the parent's pool (leaked) and build a new one.
void after_fork_child() {
  g_pool = nullptr;
  new (&g_run_mu) std::mutex();
}
const int kAtFork = pthread_atfork(nullptr, nullptr, after_fork_child);
#endif

constexpr int64_t kMinPerThread = 1 << 14;  // below this, thread hand-off costs more than it saves
constexpr int64_t kTasksPerThread = 4;       // finer tasks balance the load when threads are delayed

// How a run over n elements is cut: tasks of equal size on 16-element boundaries (only the last
// one has a tail), at most `threads` threads.
struct Split {
  int64_t threads;
  int64_t per;    // elements per task
  int64_t tasks;
};

Split split_for(int64_t n, int num_threads) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / kMinPerThread));
  if (threads == 1) return {1, n, 1};
  const int64_t want = std::min<int64_t>(threads * kTasksPerThread, n / kMinPerThread);
  const int64_t per = ((n + want - 1) / want + 15) / 16 * 16;
  return {threads, per, (n + per - 1) / per};
}

// body(begin, end, task) for every task of `sp`, on the caller alone or with the pool.
void run_split(const Split& sp, int64_t n, const std::function<void(int64_t, int64_t, int64_t)>& body) {
  if (sp.threads == 1) {
    body(0, n, 0);
    return;
  }
  std::lock_guard<std::mutex> lk(g_run_mu);
  if (!g_pool || g_pool->workers() < sp.threads - 1) {
    delete g_pool;
    g_pool = new Pool(static_cast<int>(sp.threads - 1));
  }
  g_pool->run(static_cast<int>(sp.threads), sp.tasks, [&](int64_t t) {
    const int64_t b = t * sp.per;
    body(b, std::min(n, b + sp.per), t);
  });
}

// `stats`: nullptr, or two doubles to which the sum and the sum of squares of the update
// direction are added.
void run_job(const Job& job, int64_t n, int num_threads, double* stats) {
  const KernelFn fn = kernel_for(static_cast<Simd>(g_simd.load()));
  const Split sp = split_for(n, num_threads);
  std::vector<Stats> per_task(stats ? sp.tasks : 0);
  run_split(sp, n, [&](int64_t b, int64_t e, int64_t t) { fn(job, b, e, stats ? &per_task[t] : nullptr); });
  for (const Stats& st : per_task) {  // in task order: the same sums whichever thread ran a task
    stats[0] += st.sum;
    stats[1] += st.sum_sq;
  }
}

// The memory roofline of the kernel: the same loads and stores as an fp32 Adam step (master,
// exp_avg and exp_avg_sq read and written, grad read: 28 bytes an element), one add each, no
// other arithmetic, split over the same threads. Benchmarks compare the Adam rate to this.
#ifdef BMT_X86
__attribute__((target("avx2,fma")))
#endif
void stream_range(float* __restrict__ a, float* __restrict__ b, float* __restrict__ c, const float* __restrict__ g,
                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = g[i];
    a[i] += x;
    b[i] += x;
    c[i] += x;
  }
}

void stream_probe(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t g, int64_t n, int num_threads) {
  if (n < 0 || num_threads < 1)
    throw std::invalid_argument("stream_probe needs n >= 0 and num_threads >= 1, got n=" + std::to_string(n) +
                                ", num_threads=" + std::to_string(num_threads));
  if (!a || !b || !c || !g) throw std::invalid_argument("stream_probe pointers must be non-null");
  py::gil_scoped_release release;
  auto* pa = reinterpret_cast<float*>(a);
  auto* pb = reinterpret_cast<float*>(b);
  auto* pc = reinterpret_cast<float*>(c);
  const auto* pg = reinterpret_cast<const float*>(g);
  run_split(split_for(n, num_threads), n, [&](int64_t s, int64_t e, int64_t) { stream_range(pa, pb, pc, pg, s, e); });
}

Dtype parse_dtype(int d, const char* what) {
  if (d < 0 || d > 2) throw std::invalid_argument(std::string(what) + " dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(d));
  return static_cast<Dtype>(d);
}

// Checks adam_step's arguments and builds the job (n == 0 is valid: nothing to do).
Job make_job(uintptr_t master, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad, int grad_dtype,
             uintptr_t out, int out_dtype, int64_t n, float decay, float one_minus_beta1, float beta2,
             float one_minus_beta2, float eps, float step_size, float bc2_sqrt, float grad_mul, int num_threads,
             float inv_bc1, float weight_decay, uintptr_t master_out, uintptr_t exp_avg_out,
             uintptr_t exp_avg_sq_out) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (n > 0 && (!master || !exp_avg || !exp_avg_sq || !grad))
    throw std::invalid_argument("master, exp_avg, exp_avg_sq and grad pointers must be non-null");
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
  const int outs = (master_out != 0) + (exp_avg_out != 0) + (exp_avg_sq_out != 0);
  if (outs != 0 && outs != 3)
    throw std::invalid_argument("master_out, exp_avg_out and exp_avg_sq_out are given all three (out of place) or none (in place)");
  if (outs == 0) {
    master_out = master;
    exp_avg_out = exp_avg;
    exp_avg_sq_out = exp_avg_sq;
  }
  return Job{reinterpret_cast<const float*>(master),
             reinterpret_cast<const float*>(exp_avg),
             reinterpret_cast<const float*>(exp_avg_sq),
             reinterpret_cast<float*>(master_out),
             reinterpret_cast<float*>(exp_avg_out),
             reinterpret_cast<float*>(exp_avg_sq_out),
             reinterpret_cast<const void*>(grad),
             parse_dtype(grad_dtype, "grad"),
             reinterpret_cast<void*>(out),
             parse_dtype(out_dtype, "out"),
             Hyper{decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_mul,
                   1.0f / bc2_sqrt, inv_bc1, weight_decay}};
}

void adam_step(uintptr_t master, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad, int grad_dtype,
               uintptr_t out, int out_dtype, int64_t n, float decay, float one_minus_beta1, float beta2,
               float one_minus_beta2, float eps, float step_size, float bc2_sqrt, float grad_mul, int num_threads,
               uintptr_t stats, float inv_bc1, float weight_decay, uintptr_t master_out, uintptr_t exp_avg_out,
               uintptr_t exp_avg_sq_out) {
  const Job job = make_job(master, exp_avg, exp_avg_sq, grad, grad_dtype, out, out_dtype, n, decay, one_minus_beta1,
                           beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_mul, num_threads, inv_bc1,
                           weight_decay, master_out, exp_avg_out, exp_avg_sq_out);
  if (n == 0) return;
  py::gil_scoped_release release;
  run_job(job, n, num_threads, reinterpret_cast<double*>(stats));
}

// ---------------------------------------------------------------- the update queue
// Jobs run one after another (the highest priority first, then in submission order) on a driver thread of their own, which never holds the GIL: a Python
// thread that called adam_step chunk by chunk had to take the GIL back after each chunk, and while
// the main thread ran a forward or backward that wait stalled the CPU Adam (a 32M-element chunk on
// one thread: 0.028 s alone, 0.071 s beside a busy main thread). Here the next chunk starts the
// moment the last one ends; Python only waits for results.
class AdamQueue {
 public:
  AdamQueue() : pid_(current_pid()), thread_(new std::thread([this] { loop(); })) {}
  ~AdamQueue() { close(); }
  AdamQueue(const AdamQueue&) = delete;
  AdamQueue& operator=(const AdamQueue&) = delete;

  // Queue one update (the arguments as adam_step's); returns its ticket (1, 2, ...).
  int64_t submit(uintptr_t master, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad, int grad_dtype,
                 uintptr_t out, int out_dtype, int64_t n, float decay, float one_minus_beta1, float beta2,
                 float one_minus_beta2, float eps, float step_size, float bc2_sqrt, float grad_mul, int num_threads,
                 uintptr_t stats, float inv_bc1, float weight_decay, int64_t priority, uintptr_t master_out,
                 uintptr_t exp_avg_out, uintptr_t exp_avg_sq_out) {
    check_process("submit");
    Task task{make_job(master, exp_avg, exp_avg_sq, grad, grad_dtype, out, out_dtype, n, decay, one_minus_beta1,
                       beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_mul, num_threads, inv_bc1,
                       weight_decay, master_out, exp_avg_out, exp_avg_sq_out),
              n, num_threads, reinterpret_cast<double*>(stats), 0, priority};
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) throw std::runtime_error("AdamQueue.submit: the queue is closed");
    task.ticket = ++last_ticket_;
    todo_.push_back(task);
    live_.insert(task.ticket);
    cv_.notify_all();
    return task.ticket;
  }

  // Block (without the GIL) until job `ticket` has run; returns its seconds, or raises its error.
  double wait(int64_t ticket) {
    check_process("wait");
    enum { kOk, kUnknown, kWaited, kDropped } status = kOk;
    Result r{0.0, {}};
    int64_t issued = 0;
    {
      py::gil_scoped_release release;  // released before mu_ is taken: a thread holding mu_ never waits for the GIL
      std::unique_lock<std::mutex> lk(mu_);
      issued = last_ticket_;
      if (ticket < 1 || ticket > last_ticket_) {
        status = kUnknown;
      } else {
        done_cv_.wait(lk, [&] { return live_.count(ticket) == 0; });
        auto it = results_.find(ticket);
        if (it != results_.end()) {
          r = it->second;
          results_.erase(it);
        } else {
          status = dropped_.count(ticket) ? kDropped : kWaited;
        }
      }
    }
    const std::string job = "AdamQueue.wait: job " + std::to_string(ticket);
    if (status == kUnknown)
      throw std::invalid_argument(job + " was never submitted (tickets issued: 1.." + std::to_string(issued) + ")");
    if (status == kWaited) throw std::invalid_argument(job + " was already waited for");
    if (status == kDropped) throw std::runtime_error(job + " was dropped: the queue was closed before it ran");
    if (!r.error.empty()) throw std::runtime_error("CPU Adam job " + std::to_string(ticket) + " failed: " + r.error);
    return r.seconds;
  }

  // Jobs submitted and not waited for yet.
  int64_t outstanding() {
    check_process("outstanding");
    std::lock_guard<std::mutex> lk(mu_);
    return static_cast<int64_t>(todo_.size() + results_.size()) + (running_ ? 1 : 0);
  }

  // Whether job `ticket` has run (or was dropped).
  bool done(int64_t ticket) {
    check_process("done");
    std::lock_guard<std::mutex> lk(mu_);
    return ticket >= 1 && ticket <= last_ticket_ && live_.count(ticket) == 0;
  }

  // Jobs run so far.
  int64_t completed() {
    check_process("completed");
    std::lock_guard<std::mutex> lk(mu_);
    return completed_;
  }

  // Stop after the running job (the queued ones are dropped) and join the driver thread.
  void close() {
    if (!thread_) return;
    if (current_pid() != pid_) {  // a forked child: the thread is the parent's; leave it alone
      (void)thread_.release();
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      closed_ = true;
      for (const Task& t : todo_) {
        live_.erase(t.ticket);
        dropped_.insert(t.ticket);
      }
      todo_.clear();
    }
    cv_.notify_all();
    done_cv_.notify_all();
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      thread_->join();
    } else {
      thread_->join();
    }
    thread_.reset();
  }

 private:
  struct Task {
    Job job;
    int64_t n;
    int num_threads;
    double* stats;
    int64_t ticket;
    int64_t priority;
  };
  struct Result {
    double seconds;
    std::string error;
  };

  static long current_pid() {
#if defined(__unix__) || defined(__APPLE__)
    return static_cast<long>(getpid());
#else
    return 0;
#endif
  }

  void check_process(const char* what) const {
    if (current_pid() != pid_)
      throw std::runtime_error(std::string("AdamQueue.") + what + ": this queue was created in process " +
                               std::to_string(pid_) + " and its thread does not exist in this forked child (" +
                               std::to_string(current_pid()) + "); create a new queue here");
  }

  void loop() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return closed_ || !todo_.empty(); });
        if (closed_) return;
        auto best = todo_.begin();  // the first of the highest priority
        for (auto it = todo_.begin(); it != todo_.end(); ++it)
          if (it->priority > best->priority) best = it;
        task = *best;
        todo_.erase(best);
        running_ = true;
      }
      Result r{0.0, {}};
      const auto t0 = std::chrono::steady_clock::now();
      try {
        run_job(task.job, task.n, task.num_threads, task.stats);
      } catch (const std::exception& e) {
        r.error = e.what();
      } catch (...) {
        r.error = "unknown error";
      }
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      {
        std::lock_guard<std::mutex> lk(mu_);
        results_[task.ticket] = r;
        live_.erase(task.ticket);
        ++completed_;
        running_ = false;
      }
      done_cv_.notify_all();
    }
  }

  const long pid_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Task> todo_;                  // guarded by mu_, in ticket order
  std::map<int64_t, Result> results_;      // guarded by mu_: finished, not waited for yet
  std::set<int64_t> live_;                 // guarded by mu_: queued or running
  std::set<int64_t> dropped_;              // guarded by mu_: never run (the queue was closed)
  int64_t last_ticket_ = 0;                // guarded by mu_
  int64_t completed_ = 0;                  // guarded by mu_: jobs run
  bool running_ = false;                   // guarded by mu_
  bool closed_ = false;                    // guarded by mu_
  std::unique_ptr<std::thread> thread_;    // declared last: it starts once the rest exists
};

void set_simd(const std::string& name) {
  Simd want;
  if (name == "avx512") want = Simd::Avx512;
  else if (name == "avx2") want = Simd::Avx2;
  else if (name == "scalar") want = Simd::Scalar;
  else throw std::invalid_argument("simd level must be 'avx512', 'avx2' or 'scalar', got '" + name + "'");
  if (static_cast<int>(want) > static_cast<int>(kBestSimd))
    throw std::invalid_argument(std::string("this CPU supports at most '") + simd_name(kBestSimd) + "', asked for '" + name + "'");
  g_simd.store(static_cast<int>(want));
}

}  // namespace

PYBIND11_MODULE(_cpu_adam, m) {
  m.doc() = "bmt-optim CPU Adam: SIMD (AVX-512/AVX2 chosen at run time) and threads over raw pointers";
  m.def("adam_step", &adam_step, py::arg("master"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad"),
        py::arg("grad_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("decay"),
        py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps"),
        py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("grad_mul"), py::arg("num_threads"),
        py::arg("stats") = 0, py::arg("inv_bc1") = 1.0f, py::arg("weight_decay") = 0.0f, py::arg("master_out") = 0,
        py::arg("exp_avg_out") = 0, py::arg("exp_avg_sq_out") = 0,
        "Update n elements: master/exp_avg/exp_avg_sq (fp32) in place, or into master_out/exp_avg_out/exp_avg_sq_out "
        "(all three or none; the inputs are then only read), grad (dtype code), out (0 = none). "
        "stats (0 = none): two float64 to which the sum and sum of squares of the update direction "
        "m_hat / (sqrt(v_hat) + eps) + weight_decay * p are added.");
  py::class_<AdamQueue>(m, "AdamQueue",
                        "CPU Adam jobs run in order on a driver thread that never holds the GIL.")
      .def(py::init<>())
      .def("submit", &AdamQueue::submit, py::arg("master"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
           py::arg("grad"), py::arg("grad_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"),
           py::arg("decay"), py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"),
           py::arg("eps"), py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("grad_mul"), py::arg("num_threads"),
           py::arg("stats") = 0, py::arg("inv_bc1") = 1.0f, py::arg("weight_decay") = 0.0f,
           py::arg("priority") = 0, py::arg("master_out") = 0, py::arg("exp_avg_out") = 0, py::arg("exp_avg_sq_out") = 0,
           "Queue an update (adam_step's arguments; the memory must stay valid until it is waited for); "
           "returns its ticket. Queued jobs run the highest priority first, then in submission order.")
      .def("wait", &AdamQueue::wait, py::arg("ticket"),
           "Wait (GIL released) for a job; returns the seconds it ran, or raises the error it raised.")
      .def("outstanding", &AdamQueue::outstanding, "Jobs submitted and not yet waited for.")
      .def("done", &AdamQueue::done, py::arg("ticket"), "Whether the job has run (or was dropped).")
      .def("completed", &AdamQueue::completed, "Jobs run so far.")
      .def("close", &AdamQueue::close, "Drop the queued jobs, finish the running one, join the thread.");
  m.def("stream_probe", &stream_probe, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("g"), py::arg("n"),
        py::arg("num_threads"),
        "a += g, b += g, c += g over n fp32 elements: Adam's memory traffic without its arithmetic "
        "(the bandwidth ceiling benchmarks compare the kernel to).");
  m.def("best_simd", [] { return std::string(simd_name(kBestSimd)); }, "Widest SIMD level this CPU supports.");
  m.def("simd", [] { return std::string(simd_name(static_cast<Simd>(g_simd.load()))); }, "SIMD level in use.");
  m.def("set_simd", &set_simd, py::arg("name"), "Use a SIMD level up to best_simd() (for tests and benchmarks).");
}
