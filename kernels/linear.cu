// Kernels of the linear demo, compiled at run time by NVRTC (crates/gpu/src/kernels.rs).
// No headers: only what NVRTC provides built in.
//
// seeded_inputs:   x[b*n + i] = the i-th uniform draw of SplitMix64 seeded with seeds[b], bit for bit
//                  the same as the host (examples/linear/seeded.rs).
// bias_add_rowsum: y[b*out + o] += bias[o]; y_sum[b] = sum over o of the new row, in double;
//                  y_head[b*head + o] = the new y[b*out + o] for o < head (the answer's first values,
//                  gathered so one small copy brings them back). One block of exactly 256 threads
//                  per row; y_sum[b] is WRITTEN (not accumulated), so it needs no zeroing, and the
//                  summation order is fixed (bit-identical reruns).

#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ULL
#define ROWSUM_THREADS 256

// Draw i (0-based) of SplitMix64 seeded with `seed`: the state after i+1 steps is
// seed + (i+1)*gamma (wrapping), so every draw is computable on its own.
__device__ __forceinline__ unsigned long long splitmix64_draw(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ULL) * SPLITMIX_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Uniform in [-1, 1) from the top 24 bits: (z >> 40) / 2^23 - 1, exact in f32.
__device__ __forceinline__ float splitmix64_uniform(unsigned long long z) {
    return (float)(z >> 40) / 8388608.0f - 1.0f;
}

// x: [batch, n] row-major; seeds: [batch]. Any grid (grid-stride loop over batch*n).
extern "C" __global__ void seeded_inputs(float* x, const unsigned long long* seeds, int batch, int n) {
    long long total = (long long)batch * (long long)n;
    long long stride = (long long)gridDim.x * (long long)blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += stride) {
        long long b = k / n;
        long long i = k - b * n;
        x[k] = splitmix64_uniform(splitmix64_draw(seeds[b], (unsigned long long)i));
    }
}

// y: [batch, out] row-major; bias: [out]; y_sum: [batch]; y_head: [batch, head], head <= out.
// Launch with blockDim.x == 256 (ROWSUM_THREADS); any gridDim.x (grid-stride loop over rows).
extern "C" __global__ void bias_add_rowsum(float* y, const float* bias, double* y_sum, float* y_head,
                                           int batch, int out, int head) {
    __shared__ double partial[ROWSUM_THREADS];
    for (long long b = blockIdx.x; b < batch; b += gridDim.x) {
        float* row = y + b * (long long)out;
        double acc = 0.0;
        for (int o = threadIdx.x; o < out; o += blockDim.x) {
            float v = row[o] + bias[o];
            row[o] = v;
            if (o < head) {
                y_head[b * (long long)head + o] = v;
            }
            acc += (double)v;
        }
        partial[threadIdx.x] = acc;
        __syncthreads();
        for (int s = ROWSUM_THREADS / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                partial[threadIdx.x] += partial[threadIdx.x + s];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            y_sum[b] = partial[0];
        }
        __syncthreads(); // partial[] is reused by the next row
    }
}
