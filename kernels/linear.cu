// Kernels of the linear demo, compiled at run time by NVRTC (crates/gpu/src/kernels.rs).
// No headers: only what NVRTC provides built in.
//
// seeded_inputs:   x[b*n + i] = the i-th uniform draw of SplitMix64 seeded with seeds[b], bit for bit
//                  the same as the host (examples/linear/seeded.rs).
// bias_add_rowsum: y[b*out + o] += bias[o]; y_sum[b] = sum over o of the new row, in double;
//                  y_head[b*head + o] = the new y[b*out + o] for o < head (the answer's first values,
//                  gathered so one small copy brings them back). One block of exactly 1024
//                  threads per row, each with 8 loads in flight (a row is 200 KB for the seed's
//                  model: one thread per element in turn would wait on memory ~200 times);
//                  y_sum[b] is WRITTEN (not accumulated), so it needs no zeroing, and the
//                  summation order is fixed (bit-identical reruns).
// linear_small8/16: y[b*out + o] = sum over i of w[o*in + i] * x[b*in + i], for batch <= 8 / 16:
//                  the lane's small passes at the HBM limit, where cuBLAS's fp32 kernels for a
//                  skinny product run at half of it. Each warp streams SMALL_ROWS rows of w once
//                  (float4 loads) against x chunks staged in shared memory; fixed order, fp32.

#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ULL
#define ROWSUM_THREADS 1024
#define ROWSUM_UNROLL 8

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
// Launch with blockDim.x == 1024 (ROWSUM_THREADS); any gridDim.x (grid-stride loop over rows).
extern "C" __global__ void __launch_bounds__(ROWSUM_THREADS)
bias_add_rowsum(float* __restrict__ y, const float* __restrict__ bias, double* __restrict__ y_sum,
                float* __restrict__ y_head, int batch, int out, int head) {
    __shared__ double partial[ROWSUM_THREADS];
    for (long long b = blockIdx.x; b < batch; b += gridDim.x) {
        float* row = y + b * (long long)out;
        double acc = 0.0;
        for (int base = threadIdx.x; base < out; base += ROWSUM_THREADS * ROWSUM_UNROLL) {
            float v[ROWSUM_UNROLL];
#pragma unroll
            for (int u = 0; u < ROWSUM_UNROLL; u++) {
                int o = base + u * ROWSUM_THREADS;
                v[u] = o < out ? row[o] + bias[o] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < ROWSUM_UNROLL; u++) {
                int o = base + u * ROWSUM_THREADS;
                if (o < out) {
                    row[o] = v[u];
                    if (o < head) {
                        y_head[b * (long long)head + o] = v[u];
                    }
                    acc += (double)v[u];
                }
            }
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

#define SMALL_THREADS 256
#define SMALL_ROWS 4

// w: [out, in] row-major, x: [batch, in] row-major, y: [batch, out] row-major; in % 4 == 0, w and
// x 16-byte aligned, batch <= MAXB. blockDim.x == SMALL_THREADS; gridDim.x == ceil(out / rows
// per block). Every warp owns SMALL_ROWS rows of w and reads each of their elements once; each
// lane keeps SMALL_ROWS x MAXB partial sums, reduced across the warp at the end.
#define LINEAR_SMALL(NAME, MAXB, CHUNK4)                                                            \
extern "C" __global__ void __launch_bounds__(SMALL_THREADS)                                         \
NAME(const float* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,              \
     int batch, int out, int in) {                                                                  \
    __shared__ float4 xs[MAXB][CHUNK4];                                                             \
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;                                     \
    const int row0 = (blockIdx.x * (SMALL_THREADS / 32) + warp) * SMALL_ROWS;                       \
    const int in4 = in / 4;                                                                         \
    const float4* w4 = (const float4*)w;                                                            \
    const float4* x4 = (const float4*)x;                                                            \
    float acc[SMALL_ROWS][MAXB];                                                                    \
    _Pragma("unroll") for (int r = 0; r < SMALL_ROWS; r++)                                          \
        _Pragma("unroll") for (int b = 0; b < MAXB; b++) acc[r][b] = 0.0f;                          \
    for (int c0 = 0; c0 < in4; c0 += CHUNK4) {                                                      \
        const int n4 = in4 - c0 < CHUNK4 ? in4 - c0 : CHUNK4;                                       \
        __syncthreads();                                                                            \
        for (int i = threadIdx.x; i < MAXB * CHUNK4; i += SMALL_THREADS) {                          \
            const int b = i / CHUNK4, k = i % CHUNK4;                                               \
            float4 v;                                                                               \
            v.x = v.y = v.z = v.w = 0.0f;                                                           \
            xs[b][k] = (b < batch && k < n4) ? x4[(long long)b * in4 + c0 + k] : v;                 \
        }                                                                                           \
        __syncthreads();                                                                            \
        for (int k = lane; k < n4; k += 32) {                                                       \
            float4 wv[SMALL_ROWS];                                                                  \
            _Pragma("unroll") for (int r = 0; r < SMALL_ROWS; r++) {                                \
                const int row = row0 + r < out ? row0 + r : out - 1;                                \
                wv[r] = w4[(long long)row * in4 + c0 + k];                                          \
            }                                                                                       \
            _Pragma("unroll") for (int b = 0; b < MAXB; b++) {                                      \
                const float4 xv = xs[b][k];                                                         \
                _Pragma("unroll") for (int r = 0; r < SMALL_ROWS; r++) {                            \
                    acc[r][b] += wv[r].x * xv.x;                                            \
                    acc[r][b] += wv[r].y * xv.y;                                            \
                    acc[r][b] += wv[r].z * xv.z;                                            \
                    acc[r][b] += wv[r].w * xv.w;                                            \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    _Pragma("unroll") for (int r = 0; r < SMALL_ROWS; r++) {                                        \
        _Pragma("unroll") for (int b = 0; b < MAXB; b++) {                                          \
            float v = acc[r][b];                                                                    \
            _Pragma("unroll") for (int offset = 16; offset > 0; offset >>= 1)                       \
                v += __shfl_down_sync(0xffffffffu, v, offset);                                      \
            if (lane == 0 && b < batch && row0 + r < out) {                                         \
                y[(long long)b * out + row0 + r] = v;                                               \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}

LINEAR_SMALL(linear_small8, 8, 256)
LINEAR_SMALL(linear_small16, 16, 128)
