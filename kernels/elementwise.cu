// Element-wise ops (CpuBackend semantics, src/cpu/mod.rs) and the activation splits used by
// the tensor-core GEMMs (src/cuda/gemm.rs).

// y = a + b; b is a's shape (bcast = 0) or a row [1, cols] broadcast over rows (bcast = 1).
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ y, i64 n, int cols, int bcast) {
    GRID_STRIDE(i, n) { y[i] = a[i] + (bcast ? b[i % cols] : b[i]); }
}

extern "C" __global__ void mul_f32(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ y, i64 n, int cols, int bcast) {
    GRID_STRIDE(i, n) { y[i] = a[i] * (bcast ? b[i % cols] : b[i]); }
}

// x * sigmoid(1.702 x), as x / (1 + exp(-1.702 x)).
extern "C" __global__ void quick_gelu_f32(const float* __restrict__ x, float* __restrict__ y, i64 n) {
    GRID_STRIDE(i, n) {
        float a = x[i];
        y[i] = a / (1.0f + expf(-1.702f * a));
    }
}

// 0.5 x (1 + erf(x / sqrt 2)), in double like the CPU op.
extern "C" __global__ void gelu_erf_f32(const float* __restrict__ x, float* __restrict__ y, i64 n) {
    GRID_STRIDE(i, n) {
        double a = (double)x[i];
        y[i] = (float)(0.5 * a * (1.0 + erf(a * 0.70710678118654752440)));
    }
}

// silu(g) * u.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, const float* __restrict__ u,
                                        float* __restrict__ y, i64 n) {
    GRID_STRIDE(i, n) {
        float a = g[i];
        y[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

// x (f32, n values) -> `parts` f16 planes, out[p*n + i]: x ~= sum_p planes (hi, then the rest).
// Two planes carry 22 significant bits, so an f16 GEMM on them is as exact as f32 inputs.
extern "C" __global__ void split_f16(const float* __restrict__ x, u16* __restrict__ out, i64 n, int parts) {
    GRID_STRIDE(i, n) {
        float r = x[i];
        for (int p = 0; p < parts; p++) {
            u16 h = f2h(r);
            out[(i64)p * n + i] = h;
            r = r - h2f(h);
        }
    }
}

// The same with bf16 planes (8 significant bits each: three planes carry 24).
extern "C" __global__ void split_bf16(const float* __restrict__ x, u16* __restrict__ out, i64 n, int parts) {
    GRID_STRIDE(i, n) {
        float r = x[i];
        for (int p = 0; p < parts; p++) {
            u16 h = f2bf(r);
            out[(i64)p * n + i] = h;
            r = r - bf2f(h);
        }
    }
}

// y[i] = sum_p y_parts[p*n + i] (+ bias[i % cols]); smallest planes first.
extern "C" __global__ void combine_parts(const float* __restrict__ yp, const float* __restrict__ bias,
                                         float* __restrict__ y, i64 n, int cols, int parts) {
    GRID_STRIDE(i, n) {
        float s = 0.0f;
        for (int p = parts - 1; p >= 0; p--) s += yp[(i64)p * n + i];
        if (bias) s += bias[i % cols];
        y[i] = s;
    }
}

// y[i] += bias[i % cols].
extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ bias, i64 n, int cols) {
    GRID_STRIDE(i, n) { y[i] += bias[i % cols]; }
}

// Fill with a value (tests poison outputs with NaN).
extern "C" __global__ void fill_f32(float* __restrict__ y, float v, i64 n) {
    GRID_STRIDE(i, n) { y[i] = v; }
}
