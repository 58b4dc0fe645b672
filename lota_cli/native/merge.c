/* Merge kernels: one pass where numpy takes several.
 *
 * Compiled on first use by lota_cli/native/__init__.py (the system C compiler, no Python headers) and
 * called through ctypes, which releases the GIL: the merge's threads run these side by side.
 * The arithmetic is that of the numpy/torch path it replaces, operation for operation (float32 adds,
 * round to nearest even once), so the results are bitwise the same; no -ffast-math.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

#define MAX_INPUTS 16
#define MAX_PAIRS (MAX_INPUTS * (MAX_INPUTS - 1) / 2)

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 -> bfloat16, round to nearest even (as torch's conversion; NaN cannot arise from finite adds) */
static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline int is_finite_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7f800000u) != 0x7f800000u;
}

static inline float load_value(const void *values, int bf16, int64_t at)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)values)[at]) : ((const float *)values)[at];
}

/* v, or +0.0 where held is 0, without a branch */
static inline float keep(float v, unsigned held)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    u &= 0u - held;
    memcpy(&v, &u, 4);
    return v;
}

/* set bits among the first n (a multiple of 64) of packed bits */
static inline __attribute__((always_inline)) int64_t count_set(const uint8_t *bits, int64_t n)
{
    int64_t count = 0;
    for (int64_t word = 0; word * 64 < n; word++) {
        uint64_t w;
        memcpy(&w, bits + word * 8, 8);
        count += __builtin_popcountll(w);
    }
    return count;
}

typedef struct {
    int m;                     /* inputs */
    const uint8_t *bits[MAX_INPUTS];   /* each input's packed mask (little bit order), from the piece's first entry */
    const void *values[MAX_INPUTS];    /* each input's values, from its first one in this piece */
    int bf16[MAX_INPUTS];              /* values stored as bfloat16 (else float32) */
    int64_t left[MAX_INPUTS];          /* values there are from values[i] on (1 or more) */
    float weights[MAX_INPUTS];         /* weighted: acc = fma(value, weight, acc) per input, from acc = 0 */
    int weighted;                      /* 0: acc = value_0 + value_1 + ..., in that order */
    float scale;                       /* applied when apply_scale: acc * scale */
    int apply_scale;
    int simd;                          /* take the vector path where this CPU has it (else, and for tails: scalar) */
    /* out: values used per input; counts for the overlap statistics (merging.Overlap) */
    int64_t used[MAX_INPUTS];
    int64_t nonzero[MAX_INPUTS];       /* held entries whose value is not 0 */
    int64_t shared[MAX_PAIRS];         /* both nonzero, pairs (i < j) in itertools.combinations order */
    int64_t agree[MAX_PAIRS];          /* of those, the same sign */
} lota_inputs;

#define INLINE static inline __attribute__((always_inline))

/* A pass's counts handed back: the values used, and the overlap counts added to those of earlier pieces */
INLINE void report(lota_inputs *in, const int m, const int64_t *used, const int64_t *nonzero, const int64_t *shared,
                   const int64_t *agree)
{
    for (int i = 0; i < m; i++) {
        in->used[i] = used[i];
        in->nonzero[i] += nonzero[i];
    }
    for (int p = 0; p < m * (m - 1) / 2; p++) {
        in->shared[p] += shared[p];
        in->agree[p] += agree[p];
    }
}

/* The body of lota_merge_into for m inputs and one dtype, both constants where it is called, so the loops
 * over inputs unroll and the state lives in registers. */
INLINE int64_t merge_body(void *piece, const int dtype, int64_t n, lota_inputs *in, const int m)
{
    const uint8_t *bits[MAX_INPUTS];
    const void *values[MAX_INPUTS];
    int bf16[MAX_INPUTS];
    int64_t used[MAX_INPUTS], last[MAX_INPUTS], nonzero[MAX_INPUTS], shared[MAX_PAIRS], agree[MAX_PAIRS];
    float weights[MAX_INPUTS];
    const int weighted = in->weighted, apply_scale = in->apply_scale;
    const float scale = in->scale;
    for (int i = 0; i < m; i++) {
        bits[i] = in->bits[i];
        values[i] = in->values[i];
        bf16[i] = in->bf16[i];
        weights[i] = in->weights[i];
        used[i] = 0;
        last[i] = in->left[i] > 0 ? in->left[i] - 1 : 0;  /* reads are clamped (a dummy value when none left) */
        nonzero[i] = 0;
    }
    for (int p = 0; p < m * (m - 1) / 2; p++)
        shared[p] = agree[p] = 0;

    int64_t bad = -1;
    int bad_value = -1;
    for (int64_t word = 0; word * 64 < n && bad < 0; word++) {
        uint64_t held[MAX_INPUTS], any = 0;
        int64_t first = word * 64, count = n - first < 64 ? n - first : 64;
        for (int i = 0; i < m; i++) {
            uint64_t w = 0;
            if (count == 64)
                memcpy(&w, bits[i] + word * 8, 8);  /* little-endian: bit b is entry first + b */
            else {
                memcpy(&w, bits[i] + word * 8, (size_t)((count + 7) / 8));
                w &= ((uint64_t)1 << count) - 1;
            }
            held[i] = w;
            any |= w;
        }
        while (any) {
            int bit = __builtin_ctzll(any);
            int64_t at = first + bit;
            float got[MAX_INPUTS], acc = 0.0f;
            unsigned nz[MAX_INPUTS];
            any &= any - 1;
            for (int i = 0; i < m; i++) {
                unsigned h = (unsigned)(held[i] >> bit) & 1u;
                int64_t c = used[i] < last[i] ? used[i] : last[i];
                float raw = load_value(values[i], bf16[i], c);
                if (h & !is_finite_f32(raw)) {  /* a damaged delta: never taken otherwise */
                    bad_value = i;
                    goto done;
                }
                float v = keep(raw, h);  /* read, then keep or zero: no branch */
                used[i] += h;
                got[i] = v;
                nz[i] = v != 0.0f;
                nonzero[i] += nz[i];
                if (weighted)
                    acc = __builtin_fmaf(v, weights[i], acc);  /* torch's add_(delta, alpha=weight) */
                else
                    acc = i ? acc + v : v;
            }
            for (int i = 0, pair = 0; i < m; i++)
                for (int j = i + 1; j < m; j++, pair++) {
                    unsigned both = nz[i] & nz[j];
                    shared[pair] += both;
                    agree[pair] += both & (unsigned)(signbit(got[i]) == signbit(got[j]));
                }
            if (apply_scale)
                acc = acc * scale;
            if (dtype == 0) {
                float *p = (float *)piece;
                float sum = p[at] + acc;
                if (!is_finite_f32(sum)) {
                    bad = at;
                    break;
                }
                p[at] = sum;
            } else if (dtype == 1) {
                uint16_t *p = (uint16_t *)piece;
                uint16_t h = f32_to_bf16(bf16_to_f32(p[at]) + acc);
                if ((h & 0x7f80u) == 0x7f80u) {
                    bad = at;
                    break;
                }
                p[at] = h;
            }
#ifdef __FLT16_MAX__
            else {
                _Float16 *p = (_Float16 *)piece;
                _Float16 h = (_Float16)((float)p[at] + acc);
                if (!is_finite_f32((float)h)) {
                    bad = at;
                    break;
                }
                p[at] = h;
            }
#endif
        }
    }
done:
    report(in, m, used, nonzero, shared, agree);
    if (bad_value >= 0)
        return -100 - bad_value;
    if (bad >= 0)
        return bad;
    for (int i = 0; i < m; i++)
        if (used[i] > in->left[i])
            return -3 - i;
    return -1;
}

#define FOR_DTYPE(m)                                           \
    switch (dtype) {                                           \
    case 0: return merge_body(piece, 0, n, in, m);             \
    case 1: return merge_body(piece, 1, n, in, m);             \
    case 2: return HAVE_F16 ? merge_body(piece, 2, n, in, m) : -2; \
    default: return -2;                                        \
    }

#ifdef __FLT16_MAX__
#define HAVE_F16 1
#else
#define HAVE_F16 0
#endif

/* lota_merge_into entry by entry (see it, below). */
static int64_t merge_scalar(void *piece, int dtype, int64_t n, lota_inputs *in)
{
    switch (in->m) {  /* the common input counts get their own unrolled copy */
    case 1: FOR_DTYPE(1)
    case 2: FOR_DTYPE(2)
    case 3: FOR_DTYPE(3)
    default:
        if (in->m < 1 || in->m > MAX_INPUTS)
            return -1000;
        FOR_DTYPE(in->m)
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_SIMD 1
#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,popcnt")))

/* 16 entries' values of one input, expanded to where `held` has its bits (+0.0 elsewhere): the next
 * popcount(held) stored values, read with a masked load (nothing read past them) */
TARGET static inline __m512 expand16(const void *values, int bf16, int64_t at, __mmask16 held)
{
    int count = __builtin_popcount(held);
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1u), (const uint16_t *)values + at);
        __m512i f = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
        return _mm512_maskz_expand_ps(held, _mm512_castsi512_ps(f));
    }
    return _mm512_maskz_expandloadu_ps(held, (const float *)values + at);
}

/* merge_body's arithmetic, 16 entries at a time (AVX-512), over the first n entries (a multiple of 64): the
 * same float32 operations in the same order per entry, so the same bits. Returns as merge_body. */
TARGET INLINE int64_t simd_body(void *piece, const int dtype, int64_t n, lota_inputs *in, const int m)
{
    int64_t used[MAX_INPUTS], nonzero[MAX_INPUTS], shared[MAX_PAIRS], agree[MAX_PAIRS];
    for (int i = 0; i < m; i++)
        used[i] = nonzero[i] = 0;
    for (int p = 0; p < m * (m - 1) / 2; p++)
        shared[p] = agree[p] = 0;
    const __m512 scale = _mm512_set1_ps(in->scale);
    const __m512i exponent32 = _mm512_set1_epi32(0x7f800000);
    int64_t bad = -1;
    int bad_value = -1;
    for (int64_t word = 0; word * 64 < n; word++) {
        uint64_t held[MAX_INPUTS], any = 0;
        for (int i = 0; i < m; i++) {
            memcpy(&held[i], in->bits[i] + word * 8, 8);
            any |= held[i];
        }
        for (int g = 0; g < 4 && any; g++) {
            __mmask16 u = (__mmask16)(any >> (16 * g));
            if (!u)
                continue;
            __m512 acc = _mm512_setzero_ps();
            __mmask16 nz[MAX_INPUTS], neg[MAX_INPUTS];
            for (int i = 0; i < m; i++) {
                __mmask16 h = (__mmask16)(held[i] >> (16 * g));
                __m512 v = expand16(in->values[i], in->bf16[i], used[i], h);
                used[i] += __builtin_popcount(h);
                __m512i bits = _mm512_castps_si512(v);
                if (_mm512_mask_cmpeq_epi32_mask(h, _mm512_and_si512(bits, exponent32), exponent32)) {
                    bad_value = i;
                    goto done;
                }
                nz[i] = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_OQ);
                neg[i] = _mm512_movepi32_mask(bits);
                nonzero[i] += __builtin_popcount(nz[i]);
                if (in->weighted)
                    acc = _mm512_fmadd_ps(v, _mm512_set1_ps(in->weights[i]), acc);
                else
                    acc = i ? _mm512_add_ps(acc, v) : v;
            }
            for (int i = 0, pair = 0; i < m; i++)
                for (int j = i + 1; j < m; j++, pair++) {
                    __mmask16 both = nz[i] & nz[j];
                    shared[pair] += __builtin_popcount(both);
                    agree[pair] += __builtin_popcount(both & (__mmask16)~(neg[i] ^ neg[j]));
                }
            if (in->apply_scale)
                acc = _mm512_mul_ps(acc, scale);
            int64_t at = word * 64 + g * 16;
            __mmask16 inf;
            if (dtype == 0) {
                float *p = (float *)piece + at;
                __m512 sum = _mm512_add_ps(_mm512_loadu_ps(p), acc);
                inf = _mm512_mask_cmpeq_epi32_mask(u, _mm512_and_si512(_mm512_castps_si512(sum), exponent32),
                                                   exponent32);
                if (!inf)
                    _mm512_mask_storeu_ps(p, u, sum);
            } else {
                uint16_t *p = (uint16_t *)piece + at;
                __m256i old = _mm256_loadu_si256((const __m256i *)p), h;
                if (dtype == 1) {
                    __m512 base = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16));
                    __m512i r = _mm512_castps_si512(_mm512_add_ps(base, acc));
                    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(r, 16), _mm512_set1_epi32(1));
                    r = _mm512_add_epi32(_mm512_add_epi32(r, _mm512_set1_epi32(0x7fff)), odd);
                    h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
                } else {
                    __m512 sum = _mm512_add_ps(_mm512_cvtph_ps(old), acc);
                    h = _mm512_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                }
                const __m256i exponent16 = _mm256_set1_epi16(dtype == 1 ? 0x7f80 : 0x7c00);
                inf = _mm256_mask_cmpeq_epi16_mask(u, _mm256_and_si256(h, exponent16), exponent16);
                if (!inf)
                    _mm256_mask_storeu_epi16(p, u, h);
            }
            if (inf) {
                bad = at + __builtin_ctz(inf);
                goto done;
            }
        }
    }
done:
    report(in, m, used, nonzero, shared, agree);
    if (bad_value >= 0)
        return -100 - bad_value;
    return bad;
}

TARGET static int64_t count_set_simd(const uint8_t *bits, int64_t n)
{
    return count_set(bits, n);  /* inlined here, with the popcnt instruction */
}

TARGET static int64_t nonfinite_simd(const void *data, int dtype, int64_t n)
{
    int64_t i = 0;
    if (dtype == 0) {
        const __m512i exponent = _mm512_set1_epi32(0x7f800000);
        for (; i + 16 <= n; i += 16) {
            __m512i u = _mm512_and_si512(_mm512_loadu_si512((const void *)((const uint32_t *)data + i)), exponent);
            __mmask16 bad = _mm512_cmpeq_epi32_mask(u, exponent);
            if (bad)
                return i + __builtin_ctz(bad);
        }
    } else {
        const __m512i exponent = _mm512_set1_epi16(dtype == 1 ? 0x7f80 : 0x7c00);
        for (; i + 32 <= n; i += 32) {
            __m512i u = _mm512_and_si512(_mm512_loadu_si512((const void *)((const uint16_t *)data + i)), exponent);
            __mmask32 bad = _mm512_cmpeq_epi16_mask(u, exponent);
            if (bad)
                return i + __builtin_ctz(bad);
        }
    }
    return -1 - i;  /* none among the first i: the rest is the caller's */
}

TARGET static int64_t merge_simd(void *piece, int dtype, int64_t n, lota_inputs *in)
{
    switch (in->m) {
    case 1: return simd_body(piece, dtype, n, in, 1);
    case 2: return simd_body(piece, dtype, n, in, 2);
    case 3: return simd_body(piece, dtype, n, in, 3);
    default: return simd_body(piece, dtype, n, in, in->m);
    }
}

static int have_simd(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
    return known;
}
#else
#define HAVE_SIMD 0
#endif

/* The inputs' merged delta added to a base piece of n entries (dtype 0 float32, 1 bfloat16, 2 float16) in
 * place, at the positions any input holds, rounded once: as merging's sum / task_arithmetic over the
 * inputs laid over the union of their positions (zeros elsewhere), then added to the base in float32.
 * Returns -1; or the first entry whose result is not finite (the piece is then partly changed: discard it);
 * -2 for a dtype this build lacks; -3 - i when input i holds more entries than it has values left; -100 - i
 * when a value of input i is NaN or Inf. Whole words of 64 entries take the vector path where the CPU has
 * AVX-512 (and in->simd), the rest the scalar one. */
int64_t lota_merge_into(void *piece, int dtype, int64_t n, lota_inputs *in)
{
    if (in->m < 1 || in->m > MAX_INPUTS)
        return -1000;
    if (dtype < 0 || dtype > 2 || (dtype == 2 && !HAVE_F16))
        return -2;
#if HAVE_SIMD
    int64_t head = n / 64 * 64;
    if (!in->simd || !head || !have_simd())
        return merge_scalar(piece, dtype, n, in);
    for (int i = 0; i < in->m; i++)  /* the vector path reads only what the bits say: check they say no more */
        if (count_set_simd(in->bits[i], head) > in->left[i])
            return -3 - i;
    int64_t r = merge_simd(piece, dtype, head, in);
    if (r != -1 || head == n)
        return r;
    /* the tail, past the whole words: the scalar path from where the vector one stopped (its counts go on
     * adding up in `rest`, which is then handed back whole) */
    static const float none = 0.0f;
    lota_inputs rest = *in;
    for (int i = 0; i < in->m; i++) {
        rest.bits[i] = in->bits[i] + head / 8;
        rest.values[i] = in->used[i] < in->left[i]
            ? (const char *)in->values[i] + in->used[i] * (in->bf16[i] ? 2 : 4) : (const void *)&none;
        rest.left[i] = in->left[i] - in->used[i];
    }
    r = merge_scalar((char *)piece + head * (dtype ? 2 : 4), dtype, n - head, &rest);
    for (int i = 0; i < in->m; i++)
        in->used[i] += rest.used[i];
    memcpy(in->nonzero, rest.nonzero, sizeof in->nonzero);
    memcpy(in->shared, rest.shared, sizeof in->shared);
    memcpy(in->agree, rest.agree, sizeof in->agree);
    return r >= 0 ? r + head : r;
#else
    return merge_scalar(piece, dtype, n, in);
#endif
}

/* The first of n entries (dtype as lota_merge_into) that is NaN or Inf (every exponent bit set), or -1: each
 * block of entries is tested without a branch per entry, which the compiler vectorizes; a failing block is
 * then searched. */
int64_t lota_first_nonfinite(const void *data, int dtype, int64_t n)
{
    int64_t from = 0;
#if HAVE_SIMD
    if (have_simd()) {
        int64_t r = nonfinite_simd(data, dtype, n);
        if (r >= 0)
            return r;
        from = -1 - r;
    }
#endif
    const uint32_t *f32 = (const uint32_t *)data;
    const uint16_t *f16 = (const uint16_t *)data;
    const uint16_t exponent = dtype == 1 ? 0x7f80u : 0x7c00u;  /* bfloat16's, float16's */
    for (int64_t block = from; block < n; block += 4096) {
        int64_t end = n - block < 4096 ? n : block + 4096;
        unsigned bad = 0;
        if (dtype == 0)
            for (int64_t i = block; i < end; i++)
                bad |= (f32[i] & 0x7f800000u) == 0x7f800000u;
        else
            for (int64_t i = block; i < end; i++)
                bad |= (uint16_t)(f16[i] & exponent) == exponent;
        if (bad)
            for (int64_t i = block; i < end; i++)
                if (dtype == 0 ? (f32[i] & 0x7f800000u) == 0x7f800000u : (uint16_t)(f16[i] & exponent) == exponent)
                    return i;
    }
    return -1;
}

/* One pass of masks.top_k_mask over n entries of |value| (dtype 0 float32, 1 bfloat16): an entry > hi sets its
 * bit in `sure` (packed, little bit order: every byte of the n entries' written), lo <= it <= hi appends its
 * position (from 0) and |value| to band_pos / band_val (room for n + 16). Entries whose bit is set in `excluded`
 * (NULL: none) are neither. Returns how many entries the band got, or -1 - i where entry i is NaN or Inf.
 * n a multiple of 8 but for a tensor's last piece. */
static int64_t scan_scalar(const void *data, int dtype, int64_t from, int64_t n, float lo, float hi,
                           const uint8_t *excluded, uint8_t *sure, int64_t *band_pos, float *band_val,
                           int64_t count)
{
    for (int64_t byte = from / 8; byte * 8 < n; byte++) {
        unsigned bits = 0, skip = excluded ? excluded[byte] : 0;
        for (int b = 0; b < 8 && byte * 8 + b < n; b++) {
            int64_t i = byte * 8 + b;
            uint32_t u = dtype == 0 ? ((const uint32_t *)data)[i] & 0x7fffffffu
                                    : ((uint32_t)((const uint16_t *)data)[i] & 0x7fffu) << 16;
            if (u >= 0x7f800000u)
                return -1 - i;
            float m;
            memcpy(&m, &u, 4);
            unsigned free = !((skip >> b) & 1u), above = free & (m > hi), band = free & (m >= lo) & !above;
            bits |= above << b;
            band_pos[count] = i;
            band_val[count] = m;
            count += band;
        }
        sure[byte] = (uint8_t)bits;
    }
    return count;
}

#if HAVE_SIMD
TARGET static int64_t scan_simd(const void *data, int dtype, int64_t n, float lo, float hi, const uint8_t *excluded,
                                uint8_t *sure, int64_t *band_pos, float *band_val)
{
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), exponent = _mm512_set1_epi32(0x7f800000);
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    int64_t count = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = dtype == 0 ? _mm512_loadu_si512((const void *)((const uint32_t *)data + i))
                               : _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                     _mm256_loadu_si256((const __m256i *)((const uint16_t *)data + i))), 16);
        u = _mm512_and_si512(u, magnitude);
        __mmask16 bad = _mm512_cmpge_epu32_mask(u, exponent);
        if (bad)
            return -1 - (i + __builtin_ctz(bad));
        __m512 m = _mm512_castsi512_ps(u);
        uint16_t skip = 0;
        if (excluded)
            memcpy(&skip, excluded + i / 8, 2);
        __mmask16 above = _mm512_cmp_ps_mask(m, vhi, _CMP_GT_OQ) & (__mmask16)~skip;
        __mmask16 band = _mm512_cmp_ps_mask(m, vlo, _CMP_GE_OQ) & (__mmask16)~skip & (__mmask16)~above;
        memcpy(sure + i / 8, &above, 2);
        if (band) {
            _mm512_mask_compressstoreu_ps(band_val + count, band, m);
            __m512i first = _mm512_add_epi64(_mm512_set1_epi64(i), step);
            _mm512_mask_compressstoreu_epi64(band_pos + count, (__mmask8)band, first);
            _mm512_mask_compressstoreu_epi64(band_pos + count + __builtin_popcount(band & 0xffu),
                                             (__mmask8)(band >> 8), _mm512_add_epi64(first, _mm512_set1_epi64(8)));
            count += __builtin_popcount(band);
        }
    }
    return scan_scalar(data, dtype, i, n, lo, hi, excluded, sure, band_pos, band_val, count);
}
#endif

int64_t lota_scan(const void *data, int dtype, int64_t n, float lo, float hi, const uint8_t *excluded, uint8_t *sure,
                  int64_t *band_pos, float *band_val, int simd)
{
#if HAVE_SIMD
    if (simd && have_simd())
        return scan_simd(data, dtype, n, lo, hi, excluded, sure, band_pos, band_val);
#endif
    (void)simd;
    return scan_scalar(data, dtype, 0, n, lo, hi, excluded, sure, band_pos, band_val, 0);
}
