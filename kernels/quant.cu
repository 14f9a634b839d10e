// Weights read straight from their GGUF bytes (src/quant block layouts; ggml-common.h):
//   Q8_0  34 B / 32 values: f16 d, i8 qs[32]                      v = q * d
//   Q4_0  18 B / 32 values: f16 d, u8 qs[16] (lo nibble j, hi j+16)   v = (q - 8) * d
//   Q4_K 144 B / 256 values: f16 d, f16 dmin, u8 scales[12] (6-bit scale/min pairs),
//        u8 qs[128] (chunk c of 64 values: lo nibble = value 64c+i, hi = 64c+32+i)
//        sub-block j (32 values): v = (d * sc_j) * q - (dmin * m_j)
//   Q6_K 210 B / 256 values: u8 ql[128], u8 qh[64], i8 scales[16], f16 d (last);
//        half h, quarter s, i < 32: value 128h + 32s + i has low bits from
//        ql[64h + 32(s&1) + i] >> 4(s>>1), high bits from qh[32h + i] >> 2s, scale 8h + 2s + i/16
//        v = (d * sc) * (q - 32)
// mv_*: Y[j, r] = sum_k W[r, k] X[j, k] (+ bias[r]) for n <= MAXN tokens, one warp per row,
//       f32 activations, f32 accumulation (the decode / small-batch path); steps of 256 values.
// dq_*: W -> f16 in "units" of 32 consecutive values of a row (one Q8_0/Q4_0 block, a Q4_K/Q6_K
//       sub-block), one thread per unit (the large-batch path feeds cuBLAS a chunk of rows at a
//       time). Quantized rows are whole blocks, so a row is cols/32 units.
#define MAXN 8

__device__ __forceinline__ float nib_f(u32 q) {  // small non-negative int -> float, no I2F
    return __uint_as_float(0x4B000000u | q) - 8388608.0f;
}
__device__ __forceinline__ float nib_m32(u32 q) {  // q - 32 for 0 <= q < 64, exactly
    return __uint_as_float(0x4B000000u | q) - 8388640.0f;
}

// The 6-bit scale / min pair j of a Q4_K block, from the 12 scale bytes read as three words
// (branch-free: both layouts computed, one selected, so loads of several blocks can be hoisted).
__device__ __forceinline__ void q4k_sm_words(u32 w0, u32 w1, u32 w2, int j, int* s, int* m) {
    int sh = 8 * (j & 3);
    u32 a = (w0 >> sh) & 0xFF, b = (w1 >> sh) & 0xFF, c = (w2 >> sh) & 0xFF;
    int lo = j < 4;
    *s = lo ? (int)(a & 63) : (int)((c & 0xF) | ((a >> 6) << 4));
    *m = lo ? (int)(b & 63) : (int)((c >> 4) | ((b >> 6) << 4));
}
// sc = block + 4 (4-byte aligned: Q4_K rows and blocks are multiples of 16 bytes).
__device__ __forceinline__ void q4k_scale_min(const u8* sc, int j, int* s, int* m) {
    const u32* w = (const u32*)sc;
    q4k_sm_words(w[0], w[1], w[2], j, s, m);
}

// ---- exact dequantization of one unit (32 values) -------------------------------------------
__device__ __forceinline__ void deq_q8_0(const u8* row, int u, float* v) {
    const u8* b = row + (i64)u * 34;
    float d = ld_h(b);
    for (int k = 0; k < 32; k++) v[k] = (float)(int)(i8)b[2 + k] * d;
}
__device__ __forceinline__ void deq_q4_0(const u8* row, int u, float* v) {
    const u8* b = row + (i64)u * 18;
    float d = ld_h(b);
    for (int j = 0; j < 16; j++) {
        u8 q = b[2 + j];
        v[j] = (float)((int)(q & 0xF) - 8) * d;
        v[j + 16] = (float)((int)(q >> 4) - 8) * d;
    }
}
__device__ __forceinline__ void deq_q4_k(const u8* row, int u, float* v) {
    const u8* b = row + (i64)(u >> 3) * 144;
    int j = u & 7, c = j >> 1, sh = (j & 1) * 4;
    int s, m;
    q4k_scale_min(b + 4, j, &s, &m);
    float d1 = ld_h(b) * (float)s, m1 = ld_h(b + 2) * (float)m;
    const u8* q = b + 16 + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = __fsub_rn(__fmul_rn(d1, (float)((q[i] >> sh) & 0xF)), m1);
}
__device__ __forceinline__ void deq_q6_k(const u8* row, int u, float* v) {
    const u8* b = row + (i64)(u >> 3) * 210;
    int s8 = u & 7, h = s8 >> 2, s = s8 & 3;
    const u8* ql = b + 64 * h + 32 * (s & 1);
    const u8* qh = b + 128 + 32 * h;
    int lsh = (s >> 1) * 4, hsh = 2 * s;
    float d = ld_h(b + 208);
    float ds0 = d * (float)(int)(i8)b[192 + 8 * h + 2 * s];
    float ds1 = d * (float)(int)(i8)b[192 + 8 * h + 2 * s + 1];
    for (int i = 0; i < 32; i++) {
        int q = (int)(((ql[i] >> lsh) & 0xF) | (((qh[i] >> hsh) & 3) << 4)) - 32;
        v[i] = __fmul_rn(i < 16 ? ds0 : ds1, (float)q);
    }
}

// ---- mat-vec: one warp per weight row, one "step" of 256 values per iteration ---------------
// Lane l handles 8 of the step's 256 values, chosen so that neighbouring lanes read neighbouring
// activations (coalesced x loads) and neighbouring weight bytes. Each type has a load part
// (the lane's weight bytes and scales into registers) and a compute part; the kernel issues the
// loads of 4 steps before computing any, so that 4 steps of weight bytes are in flight per warp.
// Kernels come in two widths: NT = 1 (one token: few registers, full occupancy) and NT = MAXN.
// x points at the step's first column of token 0; token j is at x + j*cols.

// Q4_K: one super-block (144 B) per step. Lane l: chunk c = l/8 (64 values), t = l%8: the qs
// word 32c + 4t holds values 64c + 4t.. (low nibbles, sub-block 2c) and 64c + 32 + 4t..
// (high nibbles, sub-block 2c+1). Factored: d1 sum q x - m1 sum x per sub-block.
struct LdQ4K {
    u32 q;
    float d0, mm0, d1, mm1;
};
__device__ __forceinline__ LdQ4K load_q4_k(const u8* row, int it, int lane, int cols) {
    const u8* b = row + (i64)it * 144;
    int c = lane >> 3, t = lane & 7;
    int s0, m0, s1, m1;
    q4k_scale_min(b + 4, 2 * c, &s0, &m0);
    q4k_scale_min(b + 4, 2 * c + 1, &s1, &m1);
    float d = ld_h(b), dmin = ld_h(b + 2);
    LdQ4K L;
    L.d0 = d * (float)s0;
    L.mm0 = dmin * (float)m0;
    L.d1 = d * (float)s1;
    L.mm1 = dmin * (float)m1;
    L.q = *(const u32*)(b + 16 + 32 * c + 4 * t);
    return L;
}
template <int NT>
__device__ __forceinline__ void comp_q4_k(const LdQ4K& L, int lane, const float* x, int cols, int n, float* acc) {
    int c = lane >> 3, t = lane & 7;
    u32 q = L.q;
    _Pragma("unroll") for (int j = 0; j < NT; j++) {
        if (j < n) {
            const float* xj = x + (i64)j * cols + 64 * c + 4 * t;
            float4 lo = *(const float4*)xj;
            float4 hi = *(const float4*)(xj + 32);
            float sq0 = nib_f(q & 0xF) * lo.x + nib_f((q >> 8) & 0xF) * lo.y +
                        nib_f((q >> 16) & 0xF) * lo.z + nib_f((q >> 24) & 0xF) * lo.w;
            float sq1 = nib_f((q >> 4) & 0xF) * hi.x + nib_f((q >> 12) & 0xF) * hi.y +
                        nib_f((q >> 20) & 0xF) * hi.z + nib_f(q >> 28) * hi.w;
            float sx0 = (lo.x + lo.y) + (lo.z + lo.w), sx1 = (hi.x + hi.y) + (hi.z + hi.w);
            acc[j] += (L.d0 * sq0 - L.mm0 * sx0) + (L.d1 * sq1 - L.mm1 * sx1);
        }
    }
}

// Q6_K: one super-block (210 B, 2-byte aligned) per step. Lane l: half h = l/16, i = 2(l%16):
// the ql bytes i, i+1 and i+32, i+33 and the qh bytes i, i+1 give values 128h + 32s + i + k
// (s = 0..3, k = 0..1) with scale 8h + i/16 + 2s; (q - 32) is formed exactly before the product.
struct LdQ6K {
    u32 l0, l1, hh;
    float ds[4];
};
__device__ __forceinline__ LdQ6K load_q6_k(const u8* row, int it, int lane, int cols) {
    const u8* b = row + (i64)it * 210;
    int h = lane >> 4, i = 2 * (lane & 15);
    LdQ6K L;
    L.l0 = ld_u16(b + 64 * h + i);
    L.l1 = ld_u16(b + 64 * h + 32 + i);
    L.hh = ld_u16(b + 128 + 32 * h + i);
    float d = ld_h(b + 208);
    const i8* sc = (const i8*)(b + 192 + 8 * h + i / 16);
    _Pragma("unroll") for (int s = 0; s < 4; s++) L.ds[s] = d * (float)(int)sc[2 * s];
    return L;
}
template <int NT>
__device__ __forceinline__ void comp_q6_k(const LdQ6K& L, int lane, const float* x, int cols, int n, float* acc) {
    int h = lane >> 4, i = 2 * (lane & 15);
    u32 q[4][2];
    _Pragma("unroll") for (int s = 0; s < 4; s++) {
        u32 lw = (s & 1) ? L.l1 : L.l0;
        int sh = (s >> 1) * 4;
        _Pragma("unroll") for (int k = 0; k < 2; k++)
            q[s][k] = ((lw >> (8 * k + sh)) & 0xF) | (((L.hh >> (8 * k + 2 * s)) & 3) << 4);
    }
    _Pragma("unroll") for (int j = 0; j < NT; j++) {
        if (j < n) {
            const float* xj = x + (i64)j * cols + 128 * h + i;
            float r = 0.0f;
            _Pragma("unroll") for (int s = 0; s < 4; s++) {
                float2 a = *(const float2*)(xj + 32 * s);
                r += L.ds[s] * (nib_m32(q[s][0]) * a.x + nib_m32(q[s][1]) * a.y);
            }
            acc[j] += r;
        }
    }
}

// Q8_0: eight blocks (8 x 34 B) per step; lane l: block l/4, values 8(l%4)..+8.
struct LdQ8 {
    u32 w[4];
    float d;
    int ok;
};
__device__ __forceinline__ LdQ8 load_q8_0(const u8* row, int it, int lane, int cols) {
    int blk = it * 8 + (lane >> 2), t = lane & 3;
    LdQ8 L;
    L.ok = blk * 32 < cols;
    if (!L.ok) {
        L.d = 0.0f;
        _Pragma("unroll") for (int k = 0; k < 4; k++) L.w[k] = 0;
        return L;
    }
    const u8* b = row + (i64)blk * 34;
    L.d = ld_h(b);
    _Pragma("unroll") for (int k = 0; k < 4; k++) L.w[k] = ld_u16(b + 2 + 8 * t + 2 * k);
    return L;
}
template <int NT>
__device__ __forceinline__ void comp_q8_0(const LdQ8& L, int lane, const float* x, int cols, int n, float* acc) {
    if (!L.ok) return;
    int t = lane & 3;
    float v[8];
    _Pragma("unroll") for (int k = 0; k < 4; k++) {
        v[2 * k] = (float)(int)(i8)(L.w[k] & 0xFF) * L.d;
        v[2 * k + 1] = (float)(int)(i8)(L.w[k] >> 8) * L.d;
    }
    _Pragma("unroll") for (int j = 0; j < NT; j++) {
        if (j < n) {
            const float* xj = x + (i64)j * cols + (lane >> 2) * 32 + 8 * t;
            float4 a = *(const float4*)xj, c = *(const float4*)(xj + 4);
            acc[j] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * c.x + v[5] * c.y +
                      v[6] * c.z + v[7] * c.w;
        }
    }
}

// Q4_0: eight blocks (8 x 18 B) per step; lane l: block l/4, qs bytes 4(l%4)..+4 = values
// 4t.. (low nibbles) and 16 + 4t.. (high).
struct LdQ40 {
    u32 w;
    float d;
    int ok;
};
__device__ __forceinline__ LdQ40 load_q4_0(const u8* row, int it, int lane, int cols) {
    int blk = it * 8 + (lane >> 2), t = lane & 3;
    LdQ40 L;
    L.ok = blk * 32 < cols;
    if (!L.ok) {
        L.d = 0.0f;
        L.w = 0;
        return L;
    }
    const u8* b = row + (i64)blk * 18;
    L.d = ld_h(b);
    L.w = ld_u16(b + 2 + 4 * t) | (ld_u16(b + 4 + 4 * t) << 16);
    return L;
}
template <int NT>
__device__ __forceinline__ void comp_q4_0(const LdQ40& L, int lane, const float* x, int cols, int n, float* acc) {
    if (!L.ok) return;
    int t = lane & 3;
    float lo[4], hi[4];
    _Pragma("unroll") for (int k = 0; k < 4; k++) {
        lo[k] = (float)((int)((L.w >> (8 * k)) & 0xF) - 8) * L.d;
        hi[k] = (float)((int)((L.w >> (8 * k + 4)) & 0xF) - 8) * L.d;
    }
    _Pragma("unroll") for (int j = 0; j < NT; j++) {
        if (j < n) {
            const float* xj = x + (i64)j * cols + (lane >> 2) * 32 + 4 * t;
            float4 a = *(const float4*)xj, c = *(const float4*)(xj + 16);
            acc[j] += lo[0] * a.x + lo[1] * a.y + lo[2] * a.z + lo[3] * a.w + hi[0] * c.x +
                      hi[1] * c.y + hi[2] * c.z + hi[3] * c.w;
        }
    }
}

#define MATVEC_KERNEL(NAME, NT, MV_BATCH, LDT, LOAD, COMP)                                        \
    extern "C" __global__ void NAME(const u8* __restrict__ W, const float* __restrict__ X,         \
                                    const float* __restrict__ bias, float* __restrict__ Y,         \
                                    int rows, int cols, int n, i64 row_bytes) {                    \
        int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);                        \
        int lane = threadIdx.x & 31;                                                               \
        if (row >= rows) return;                                                                   \
        const u8* wr = W + (i64)row * row_bytes;                                                   \
        float acc[NT];                                                                             \
        _Pragma("unroll") for (int j = 0; j < NT; j++) acc[j] = 0.0f;                              \
        int steps = (cols + 255) / 256;                                                            \
        int it = 0;                                                                                \
        for (; it + MV_BATCH <= steps; it += MV_BATCH) {                                           \
            LDT L[MV_BATCH];                                                                       \
            _Pragma("unroll") for (int u = 0; u < MV_BATCH; u++) L[u] = LOAD(wr, it + u, lane, cols); \
            _Pragma("unroll") for (int u = 0; u < MV_BATCH; u++)                                   \
                COMP<NT>(L[u], lane, X + (i64)(it + u) * 256, cols, n, acc);                        \
        }                                                                                          \
        for (; it < steps; it++) {                                                                 \
            LDT L0 = LOAD(wr, it, lane, cols);                                                     \
            COMP<NT>(L0, lane, X + (i64)it * 256, cols, n, acc);                                   \
        }                                                                                          \
        _Pragma("unroll") for (int j = 0; j < NT; j++) {                                           \
            if (j < n) {                                                                           \
                float s = warp_sum(acc[j]);                                                        \
                if (lane == 0) Y[(i64)j * rows + row] = s + (bias ? bias[row] : 0.0f);             \
            }                                                                                      \
        }                                                                                          \
    }
// Q4_K, one token: 16-byte loads. A step is 4 super-blocks (one per 8-lane group); lane t of a
// group loads qs bytes 16t..16t+16 (values 64c + 16(t%2) + k, low nibbles, and +32, high
// nibbles; c = t/2) plus the block's d/dmin and scale words; 4 steps (a 4096-wide row) are
// loaded before any arithmetic. Past the row's end a lane re-reads the last block and adds 0.
extern "C" __global__ void mv1_q4_k(const u8* __restrict__ W, const float* __restrict__ X,
                                    const float* __restrict__ bias, float* __restrict__ Y,
                                    int rows, int cols, int n, i64 row_bytes) {
    int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const u8* wr = W + (i64)row * row_bytes;
    const int nsb = cols / 256;
    const int g = lane >> 3, t = lane & 7, c = t >> 1, h16 = (t & 1) * 16;
    float acc = 0.0f;
    for (int sb0 = 0; sb0 < nsb; sb0 += 16) {
        uint4 q[4];
        u32 dd[4], w0[4], w1[4], w2[4];
        _Pragma("unroll") for (int u = 0; u < 4; u++) {
            int sb = min(sb0 + 4 * u + g, nsb - 1);
            const u8* b = wr + (i64)sb * 144;
            const u32* bw = (const u32*)b;
            dd[u] = bw[0];
            w0[u] = bw[1];
            w1[u] = bw[2];
            w2[u] = bw[3];
            q[u] = *(const uint4*)(b + 16 + 16 * t);
        }
        _Pragma("unroll") for (int u = 0; u < 4; u++) {
            int sb = sb0 + 4 * u + g;
            if (sb < nsb) {
                int s0, m0, s1, m1;
                q4k_sm_words(w0[u], w1[u], w2[u], 2 * c, &s0, &m0);
                q4k_sm_words(w0[u], w1[u], w2[u], 2 * c + 1, &s1, &m1);
                float d = h2f((u16)(dd[u] & 0xFFFF)), dmin = h2f((u16)(dd[u] >> 16));
                const float* x = X + (i64)sb * 256 + 64 * c + h16;
                u32 qw[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
                float sq0 = 0.0f, sq1 = 0.0f, sx0 = 0.0f, sx1 = 0.0f;
                _Pragma("unroll") for (int k = 0; k < 4; k++) {
                    float4 lo = *(const float4*)(x + 4 * k);
                    float4 hi = *(const float4*)(x + 32 + 4 * k);
                    u32 w = qw[k];
                    sq0 += nib_f(w & 0xF) * lo.x + nib_f((w >> 8) & 0xF) * lo.y +
                           nib_f((w >> 16) & 0xF) * lo.z + nib_f((w >> 24) & 0xF) * lo.w;
                    sq1 += nib_f((w >> 4) & 0xF) * hi.x + nib_f((w >> 12) & 0xF) * hi.y +
                           nib_f((w >> 20) & 0xF) * hi.z + nib_f(w >> 28) * hi.w;
                    sx0 += (lo.x + lo.y) + (lo.z + lo.w);
                    sx1 += (hi.x + hi.y) + (hi.z + hi.w);
                }
                acc += (d * (float)s0 * sq0 - dmin * (float)m0 * sx0) +
                       (d * (float)s1 * sq1 - dmin * (float)m1 * sx1);
            }
        }
    }
    float sum = warp_sum(acc);
    if (lane == 0) Y[row] = sum + (bias ? bias[row] : 0.0f);
}

// Q4_K, one token, R rows per warp: the lane layout and per-row arithmetic of mv1_q4_k (so the
// results are bit-identical to it), but each lane's activations (8 float4 per super-block
// group) are read once for R rows instead of once per row: in mv1_q4_k those L1 reads were 7x
// the weight bytes. One group of 4 super-blocks per iteration; the next group's weights are
// loaded before this group's arithmetic (software pipelining) to keep bytes in flight.
struct Q4KLane {
    uint4 q;
    u32 dd, w0, w1, w2;
};
__device__ __forceinline__ Q4KLane q4k_lane(const u8* wr, int sb, int t) {
    const u8* b = wr + (i64)sb * 144;
    const u32* bw = (const u32*)b;
    Q4KLane L;
    L.dd = bw[0];
    L.w0 = bw[1];
    L.w1 = bw[2];
    L.w2 = bw[3];
    L.q = *(const uint4*)(b + 16 + 16 * t);
    return L;
}
template <int R>
__device__ __forceinline__ void mv1_q4_k_rows(const u8* __restrict__ W, const float* __restrict__ X,
                                             const float* __restrict__ bias, float* __restrict__ Y,
                                             int rows, int cols, i64 row_bytes) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    int row0 = warp * R;
    if (row0 >= rows) return;
    const int nsb = cols / 256;
    const int g = lane >> 3, t = lane & 7, c = t >> 1, h16 = (t & 1) * 16;
    const u8* wr[R];
    _Pragma("unroll") for (int r = 0; r < R; r++) wr[r] = W + (i64)min(row0 + r, rows - 1) * row_bytes;
    float acc[R];
    _Pragma("unroll") for (int r = 0; r < R; r++) acc[r] = 0.0f;
    Q4KLane cur[R], nxt[R];
    _Pragma("unroll") for (int r = 0; r < R; r++) cur[r] = q4k_lane(wr[r], min(g, nsb - 1), t);
    for (int sb0 = 0; sb0 < nsb; sb0 += 4) {
        int sbn = min(sb0 + 4 + g, nsb - 1);  // past the end: a harmless re-read
        _Pragma("unroll") for (int r = 0; r < R; r++) nxt[r] = q4k_lane(wr[r], sbn, t);
        int sb = sb0 + g;
        if (sb < nsb) {
            const float* x = X + (i64)sb * 256 + 64 * c + h16;
            float4 lo[4], hi[4];
            _Pragma("unroll") for (int k = 0; k < 4; k++) {
                lo[k] = *(const float4*)(x + 4 * k);
                hi[k] = *(const float4*)(x + 32 + 4 * k);
            }
            _Pragma("unroll") for (int r = 0; r < R; r++) {
                const Q4KLane& L = cur[r];
                int s0, m0, s1, m1;
                q4k_sm_words(L.w0, L.w1, L.w2, 2 * c, &s0, &m0);
                q4k_sm_words(L.w0, L.w1, L.w2, 2 * c + 1, &s1, &m1);
                float d = h2f((u16)(L.dd & 0xFFFF)), dmin = h2f((u16)(L.dd >> 16));
                u32 qw[4] = {L.q.x, L.q.y, L.q.z, L.q.w};
                float sq0 = 0.0f, sq1 = 0.0f, sx0 = 0.0f, sx1 = 0.0f;
                _Pragma("unroll") for (int k = 0; k < 4; k++) {
                    u32 w = qw[k];
                    sq0 += nib_f(w & 0xF) * lo[k].x + nib_f((w >> 8) & 0xF) * lo[k].y +
                           nib_f((w >> 16) & 0xF) * lo[k].z + nib_f((w >> 24) & 0xF) * lo[k].w;
                    sq1 += nib_f((w >> 4) & 0xF) * hi[k].x + nib_f((w >> 12) & 0xF) * hi[k].y +
                           nib_f((w >> 20) & 0xF) * hi[k].z + nib_f(w >> 28) * hi[k].w;
                    sx0 += (lo[k].x + lo[k].y) + (lo[k].z + lo[k].w);
                    sx1 += (hi[k].x + hi[k].y) + (hi[k].z + hi[k].w);
                }
                acc[r] += (d * (float)s0 * sq0 - dmin * (float)m0 * sx0) +
                          (d * (float)s1 * sq1 - dmin * (float)m1 * sx1);
            }
        }
        _Pragma("unroll") for (int r = 0; r < R; r++) cur[r] = nxt[r];
    }
    _Pragma("unroll") for (int r = 0; r < R; r++) {
        float sum = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < rows) Y[row0 + r] = sum + (bias ? bias[row0 + r] : 0.0f);
    }
}
#define MV1_Q4K_ROWS(NAME, R)                                                                   \
    extern "C" __global__ void NAME(const u8* __restrict__ W, const float* __restrict__ X,      \
                                    const float* __restrict__ bias, float* __restrict__ Y,      \
                                    int rows, int cols, int n, i64 row_bytes) {                 \
        mv1_q4_k_rows<R>(W, X, bias, Y, rows, cols, row_bytes);                                 \
    }
MV1_Q4K_ROWS(mv1_q4_k_r2, 2)
MV1_Q4K_ROWS(mv1_q4_k_r4, 4)

// Steps whose loads are issued together: 4 for up to MAXN tokens, 8 for one token (fewer
// registers per step there; one warp then has 8 x 144 B of Q4_K in flight).
MATVEC_KERNEL(mv_q8_0, MAXN, 4, LdQ8, load_q8_0, comp_q8_0)
MATVEC_KERNEL(mv_q4_0, MAXN, 4, LdQ40, load_q4_0, comp_q4_0)
MATVEC_KERNEL(mv_q4_k, MAXN, 4, LdQ4K, load_q4_k, comp_q4_k)
MATVEC_KERNEL(mv_q6_k, MAXN, 4, LdQ6K, load_q6_k, comp_q6_k)
MATVEC_KERNEL(mv1_q8_0, 1, 8, LdQ8, load_q8_0, comp_q8_0)
MATVEC_KERNEL(mv1_q4_0, 1, 8, LdQ40, load_q4_0, comp_q4_0)
MATVEC_KERNEL(mv1_q6_k, 1, 8, LdQ6K, load_q6_k, comp_q6_k)

// Float weights (F32 = 0, F16 = 1, BF16 = 2), any row length. Rows whose length is a multiple
// of 8 (16-byte aligned) read 8 values per lane per step; others one value per lane.
__device__ __forceinline__ float wval(const u8* row, int k, int ty) {
    if (ty == 0) return ((const float*)row)[k];
    u16 h = ((const u16*)row)[k];
    return ty == 1 ? h2f(h) : bf2f(h);
}
__device__ __forceinline__ float hval(u32 w, int hi, int ty) {
    u16 h = (u16)(hi ? (w >> 16) : (w & 0xFFFF));
    return ty == 1 ? h2f(h) : bf2f(h);
}
extern "C" __global__ void mv_float(const u8* __restrict__ W, const float* __restrict__ X,
                                    const float* __restrict__ bias, float* __restrict__ Y,
                                    int rows, int cols, int n, i64 row_bytes, int ty) {
    int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const u8* wr = W + (i64)row * row_bytes;
    float acc[MAXN];
    _Pragma("unroll") for (int j = 0; j < MAXN; j++) acc[j] = 0.0f;
    if ((cols & 7) == 0) {
        for (int k = lane * 8; k < cols; k += 256) {
            float v[8];
            if (ty == 0) {
                float4 a = *(const float4*)(wr + 4 * (i64)k), b = *(const float4*)(wr + 4 * (i64)k + 16);
                v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
                v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
            } else {
                uint4 a = *(const uint4*)(wr + 2 * (i64)k);
                u32 w4[4] = {a.x, a.y, a.z, a.w};
                _Pragma("unroll") for (int e = 0; e < 8; e++) v[e] = hval(w4[e >> 1], e & 1, ty);
            }
            _Pragma("unroll") for (int j = 0; j < MAXN; j++) {
                if (j < n) {
                    const float* xj = X + (i64)j * cols + k;
                    float4 a = *(const float4*)xj, b = *(const float4*)(xj + 4);
                    acc[j] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x +
                              v[5] * b.y + v[6] * b.z + v[7] * b.w;
                }
            }
        }
    } else {
        for (int k = lane; k < cols; k += 32) {
            float w = wval(wr, k, ty);
            _Pragma("unroll") for (int j = 0; j < MAXN; j++) {
                if (j < n) acc[j] += w * X[(i64)j * cols + k];
            }
        }
    }
    _Pragma("unroll") for (int j = 0; j < MAXN; j++) {
        if (j < n) {
            float s = warp_sum(acc[j]);
            if (lane == 0) Y[(i64)j * rows + row] = s + (bias ? bias[row] : 0.0f);
        }
    }
}

// ---- dequantization to f16, one thread per unit ---------------------------------------------
// Units are numbered over the whole (row-major, whole-block) matrix, so unit u of the matrix is
// unit u of a "row" that starts at W; `int` unit indices stay below 2^31 per launch (the host
// launches at most 2^26 units at once).
#define DEQ_KERNEL(NAME, DEQ)                                                                  \
    extern "C" __global__ void NAME(const u8* __restrict__ W, u16* __restrict__ out, i64 units) { \
        GRID_STRIDE(u, units) {                                                                \
            float v[32];                                                                       \
            DEQ(W, (int)u, v);                                                                 \
            u32 p[16];                                                                         \
            _Pragma("unroll") for (int k = 0; k < 16; k++)                                     \
                p[k] = (u32)f2h(v[2 * k]) | ((u32)f2h(v[2 * k + 1]) << 16);                    \
            uint4* o = (uint4*)(out + u * 32);                                                 \
            _Pragma("unroll") for (int k = 0; k < 4; k++)                                      \
                o[k] = make_uint4(p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3]);         \
        }                                                                                      \
    }
DEQ_KERNEL(dq_q8_0, deq_q8_0)
DEQ_KERNEL(dq_q4_0, deq_q4_0)
DEQ_KERNEL(dq_q4_k, deq_q4_k)
DEQ_KERNEL(dq_q6_k, deq_q6_k)
