// Row-wise ops: norms, softmaxes, rotary embeddings. CpuBackend semantics (src/cpu/mod.rs):
// f64 statistics, f32 outputs.

// One block per row: (x - mean) / sqrt(var + eps) * w + b (biased variance, two passes).
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y,
                                          int cols, float eps) {
    __shared__ double sh[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float* yr = y + (i64)blockIdx.x * cols;
    double s = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += (double)xr[c];
    double mean = block_sum_d(s, sh) / (double)cols;
    double v = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        double d = (double)xr[c] - mean;
        v += d * d;
    }
    double var = block_sum_d(v, sh) / (double)cols;
    double inv = 1.0 / sqrt(var + (double)eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float nrm = (float)(((double)xr[c] - mean) * inv);
        yr[c] = __fadd_rn(__fmul_rn(nrm, w[c]), b[c]);
    }
}

// One block per row: x / sqrt(mean(x^2) + eps) * w.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int cols, float eps) {
    __shared__ double sh[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float* yr = y + (i64)blockIdx.x * cols;
    double s = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        double a = (double)xr[c];
        s += a * a;
    }
    double ms = block_sum_d(s, sh) / (double)cols;
    float inv = (float)(1.0 / sqrt(ms + (double)eps));
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = w[c] * (xr[c] * inv);
}

// One thread per group of `group` contiguous values: softmax (f64 sum).
extern "C" __global__ void softmax_groups_f32(const float* __restrict__ x, float* __restrict__ y,
                                              i64 n_groups, int group) {
    GRID_STRIDE(g, n_groups) {
        const float* xr = x + g * group;
        float* yr = y + g * group;
        float mx = -3.402823466e38f;
        for (int i = 0; i < group; i++) mx = fmaxf(mx, xr[i]);
        double s = 0.0;
        for (int i = 0; i < group; i++) {
            float e = expf(xr[i] - mx);
            yr[i] = e;
            s += (double)e;
        }
        float inv = (float)(1.0 / s);
        for (int i = 0; i < group; i++) yr[i] *= inv;
    }
}

// Attention scores in place, one block per row of s [heads * n, m]: scale, causal mask
// (query i of n sees keys 0..=m-n+i), softmax over the visible keys, zeros after them.
extern "C" __global__ void softmax_attn_f32(float* __restrict__ s, int m, int n, int causal, float scale) {
    __shared__ double shd[32];
    __shared__ float shf[32];
    i64 r = blockIdx.x;
    float* row = s + r * (i64)m;
    int qi = (int)(r % n);
    int valid = causal ? (m - n + qi + 1) : m;
    float mx = -3.402823466e38f;
    for (int c = threadIdx.x; c < valid; c += blockDim.x) {
        float v = row[c] * scale;
        row[c] = v;
        mx = fmaxf(mx, v);
    }
    mx = block_max(mx, shf);
    double sum = 0.0;
    for (int c = threadIdx.x; c < valid; c += blockDim.x) {
        float e = expf(row[c] - mx);
        row[c] = e;
        sum += (double)e;
    }
    sum = block_sum_d(sum, shd);
    float inv = (float)(1.0 / sum);
    for (int c = threadIdx.x; c < m; c += blockDim.x) row[c] = (c < valid) ? row[c] * inv : 0.0f;
}

// Interleaved-pairs rotary embedding (ggml NORM rope) on x [n, n_head*hd]: one thread per
// (token t, pair i), angle (pos0 + t) * theta^(-2i/hd) in f64, applied to every head.
extern "C" __global__ void rope_interleaved_f32(const float* __restrict__ x, float* __restrict__ y,
                                                int n, int n_head, int hd, int pos0, float theta) {
    int half = hd / 2;
    GRID_STRIDE(id, (i64)n * half) {
        int i = (int)(id % half);
        i64 t = id / half;
        double ang = (double)(pos0 + t) * pow((double)theta, -2.0 * (double)i / (double)hd);
        float co = (float)cos(ang), si = (float)sin(ang);
        for (int h = 0; h < n_head; h++) {
            i64 base = t * (i64)(n_head * hd) + (i64)h * hd + 2 * i;
            float x0 = x[base], x1 = x[base + 1];
            y[base] = __fsub_rn(__fmul_rn(x0, co), __fmul_rn(x1, si));
            y[base + 1] = __fadd_rn(__fmul_rn(x0, si), __fmul_rn(x1, co));
        }
    }
}

// Rotate_half rotary embedding (ggml NEOX rope, HF LLaMA) on x [n, n_head*hd]: as above, but
// pair i of a head is read from (x[i], x[i + hd/2]); it is written to (y[2i], y[2i+1]), the same
// permutation for Q and K, so attention sums in the interleaved road's order (Backend::rope_neox).
extern "C" __global__ void rope_neox_f32(const float* __restrict__ x, float* __restrict__ y,
                                         int n, int n_head, int hd, int pos0, float theta) {
    int half = hd / 2;
    GRID_STRIDE(id, (i64)n * half) {
        int i = (int)(id % half);
        i64 t = id / half;
        double ang = (double)(pos0 + t) * pow((double)theta, -2.0 * (double)i / (double)hd);
        float co = (float)cos(ang), si = (float)sin(ang);
        for (int h = 0; h < n_head; h++) {
            i64 head = t * (i64)(n_head * hd) + (i64)h * hd;
            float x0 = x[head + i], x1 = x[head + i + half];
            y[head + 2 * i] = __fsub_rn(__fmul_rn(x0, co), __fmul_rn(x1, si));
            y[head + 2 * i + 1] = __fadd_rn(__fmul_rn(x0, si), __fmul_rn(x1, co));
        }
    }
}

// Attention for a few queries (decode): one block per (query i, head h), no cuBLAS. q [n, H*hd],
// k and v [m, Hkv*hd], out [n, H*hd]; head h reads kv head h / (H/Hkv); causal: query i sees
// keys 0..=m-n+i. Scores live in dynamic shared memory (m floats), softmax with an f64 sum, then
// out = sum_c (e_c / sum) v_c in f32, like the CPU op.
extern "C" __global__ void attn_small_f32(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, float* __restrict__ out,
                                          int n, int m, int n_head, int n_kv, int hd, int causal,
                                          float scale) {
    extern __shared__ float smem[];
    __shared__ double shd[32];
    __shared__ float shf[32];
    float* sc = smem;          // m scores
    float* qs = smem + m;      // hd query values
    const int h = blockIdx.x, i = blockIdx.y;
    const int g = h / (n_head / n_kv);
    const int qc = n_head * hd, kc = n_kv * hd;
    const int valid = causal ? (m - n + i + 1) : m;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = q[(i64)i * qc + (i64)h * hd + d];
    __syncthreads();
    float mx = -3.402823466e38f;
    for (int c = threadIdx.x; c < valid; c += blockDim.x) {
        const float* kr = k + (i64)c * kc + (i64)g * hd;
        float s = 0.0f;
        for (int d = 0; d < hd; d++) s += qs[d] * kr[d];
        s *= scale;
        sc[c] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, shf);
    double sum = 0.0;
    for (int c = threadIdx.x; c < valid; c += blockDim.x) {
        float e = expf(sc[c] - mx);
        sc[c] = e;
        sum += (double)e;
    }
    sum = block_sum_d(sum, shd);  // ends with a barrier: every score is in place
    float inv = (float)(1.0 / sum);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        const float* vc = v + (i64)g * hd + d;
        float acc = 0.0f;
        for (int c = 0; c < valid; c++) acc += (sc[c] * inv) * vc[(i64)c * kc];
        out[(i64)i * qc + (i64)h * hd + d] = acc;
    }
}
