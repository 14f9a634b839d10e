// Multi-scale deformable attention core (Deformable-DETR ms_deform_attn_im2col), fused:
// gather + bilinear (grid_sample, align_corners=False, zero padding) + weighted sum, f32
// accumulation, no [Nq, M, L, P, D] intermediate. Same arithmetic, in the same order, as
// `msda_core` in src/cpu/mod.rs.
//
// One block per query t. Phase 1: one thread per sample k = (m*L + l)*P + p computes its four
// corner rows (or -1) and coefficients into shared memory. Phase 2: one thread per channel c
// (head m = c / D) sums coef * value[row, c] over the head's L*P samples.
struct MsdaLevels {
    int n;
    int start[8];
    int h[8];
    int w[8];
};

extern "C" __global__ void msda_f32(const float* __restrict__ value, const float* __restrict__ offsets,
                                    const float* __restrict__ weights, float* __restrict__ out,
                                    MsdaLevels lv, int ref_h, int ref_w, int n_heads, int n_points, int C) {
    extern __shared__ float smem[];
    const int L = lv.n;
    const int LP = L * n_points;
    const int per_q = n_heads * LP;
    int* rows = (int*)smem;
    float* coefs = smem + 4 * per_q;
    const int t = blockIdx.x;
    const float rx = __fdiv_rn((float)(t % ref_w) + 0.5f, (float)ref_w);
    const float ry = __fdiv_rn((float)(t / ref_w) + 0.5f, (float)ref_h);
    const float* off = offsets + (i64)t * per_q * 2;
    const float* wt = weights + (i64)t * per_q;
    for (int k = threadIdx.x; k < per_q; k += blockDim.x) {
        const int l = (k / n_points) % L;
        const int h = lv.h[l], w = lv.w[l];
        const float hf = (float)h, wf = (float)w;
        const float a = wt[k];
        const float x = __fsub_rn(__fmul_rn(__fadd_rn(rx, __fdiv_rn(off[2 * k], wf)), wf), 0.5f);
        const float y = __fsub_rn(__fmul_rn(__fadd_rn(ry, __fdiv_rn(off[2 * k + 1], hf)), hf), 0.5f);
        int r[4] = {-1, -1, -1, -1};
        float cf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (x > -1.0f && y > -1.0f && x < wf && y < hf) {  // also rejects NaN
            const float x0f = floorf(x), y0f = floorf(y);
            const float fx = x - x0f, fy = y - y0f;
            const int x0 = (int)x0f, y0 = (int)y0f;
            for (int dy = 0; dy < 2; dy++) {
                const int yy = y0 + dy;
                const float wy = dy ? fy : 1.0f - fy;
                if (yy < 0 || yy >= h) continue;
                for (int dx = 0; dx < 2; dx++) {
                    const int xx = x0 + dx;
                    const float wx = dx ? fx : 1.0f - fx;
                    if (xx < 0 || xx >= w) continue;
                    r[2 * dy + dx] = lv.start[l] + yy * w + xx;
                    cf[2 * dy + dx] = __fmul_rn(__fmul_rn(a, wy), wx);
                }
            }
        }
        for (int j = 0; j < 4; j++) {
            rows[4 * k + j] = r[j];
            coefs[4 * k + j] = cf[j];
        }
    }
    __syncthreads();
    const int D = C / n_heads;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const int m = c / D;
        float acc = 0.0f;
        for (int s = 0; s < LP; s++) {
            const int k = m * LP + s;
            for (int j = 0; j < 4; j++) {
                const int rr = rows[4 * k + j];
                if (rr >= 0) acc = __fadd_rn(acc, __fmul_rn(coefs[4 * k + j], value[(i64)rr * C + c]));
            }
        }
        out[(i64)t * C + c] = acc;
    }
}
