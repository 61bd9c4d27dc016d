// Arena kernels, compiled at run time by NVRTC together with linear.cu (crates/gpu/src/kernels.rs).
//
// arena_checksum: the checksum of a cuda-vmm arena, recorded by the owner at load and checked
// when a restarted owner re-adopts the arena from escrow. Reading 2 GB back to the host to hash
// it would cost hundreds of milliseconds; this kernel reads it at HBM speed.
//
//   word_i = the i-th little-endian 64-bit word of the arena
//   sum    = SUM over i of mix(word_i ^ ((i + 1) * GAMMA))   (wrapping, so any order of addition)
//   result = mix(sum ^ size_in_bytes)                       (the last step runs on the host)
//
// mix is SplitMix64's finaliser. The index in each term makes moved or swapped words count.
// crates/gpu/src/checksum.rs computes the same on the host; the two must agree bit for bit.

#define CHECKSUM_GAMMA 0x9E3779B97F4A7C15ULL

__device__ __forceinline__ unsigned long long checksum_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// words: n 64-bit words; sum: one zeroed word, receives the (unfinalised) sum.
// Any grid; blockDim.x a multiple of 32.
extern "C" __global__ void arena_checksum(const unsigned long long* words, unsigned long long n,
                                          unsigned long long* sum) {
    unsigned long long acc = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        acc += checksum_mix(words[i] ^ ((i + 1ULL) * CHECKSUM_GAMMA));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(sum, acc);
    }
}
