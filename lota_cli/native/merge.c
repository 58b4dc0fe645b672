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
    /* out: values used per input; counts for the overlap statistics (merging.Overlap) */
    int64_t used[MAX_INPUTS];
    int64_t nonzero[MAX_INPUTS];       /* held entries whose value is not 0 */
    int64_t shared[MAX_PAIRS];         /* both nonzero, pairs (i < j) in itertools.combinations order */
    int64_t agree[MAX_PAIRS];          /* of those, the same sign */
} lota_inputs;

#define INLINE static inline __attribute__((always_inline))

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
                float v = keep(load_value(values[i], bf16[i], c), h);  /* read, then keep or zero: no branch */
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
    for (int i = 0; i < m; i++) {
        in->used[i] = used[i];
        in->nonzero[i] += nonzero[i];
    }
    for (int p = 0; p < m * (m - 1) / 2; p++) {
        in->shared[p] += shared[p];
        in->agree[p] += agree[p];
    }
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

/* The inputs' merged delta added to a base piece of n entries (dtype 0 float32, 1 bfloat16, 2 float16) in
 * place, at the positions any input holds, rounded once: as merging's sum / task_arithmetic over the
 * inputs laid over the union of their positions (zeros elsewhere), then added to the base in float32.
 * Returns -1; or the first entry whose result is not finite (the piece is then partly changed: discard it);
 * -2 for a dtype this build lacks; -3 - i when input i holds more entries than it has values left. */
int64_t lota_merge_into(void *piece, int dtype, int64_t n, lota_inputs *in)
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
