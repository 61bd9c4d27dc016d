//! The checksum of a `cuda-vmm` arena (`kernels/arena.cu`), computed here on the host.
//!
//! The owner records it at load (on the GPU, with [`crate::Kernels::arena_checksum`]) and a
//! restarted owner recomputes it before re-adopting an escrowed arena. This host version is
//! the definition both are tested against:
//!
//! ```text
//! word_i = the i-th little-endian u64 of the arena
//! sum    = Σ mix(word_i ^ (i + 1)·γ)   (wrapping; order-free, so the GPU can add in any order)
//! result = mix(sum ^ size)             (mix = SplitMix64's finaliser, γ = 0x9E3779B97F4A7C15)
//! ```
//!
//! ```
//! use forkless_gpu::checksum::{arena_checksum, finish, partial_sum};
//! let bytes = vec![7u8; 4096];
//! assert_eq!(arena_checksum(&bytes), finish(partial_sum(&bytes, 0), 4096));
//! assert_ne!(arena_checksum(&bytes), arena_checksum(&[7u8; 4088]));
//! ```

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser, as in the kernel.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The unfinalised sum over `bytes`, whose first word is word number `first_word` of the
/// arena. `bytes.len()` must be a multiple of 8 (arenas are whole pages).
pub fn partial_sum(bytes: &[u8], first_word: u64) -> u64 {
    debug_assert_eq!(bytes.len() % 8, 0, "arenas are whole pages");
    bytes.chunks_exact(8).zip(first_word..).fold(0u64, |acc, (word, i)| {
        let word = u64::from_le_bytes(word.try_into().expect("chunks of 8"));
        acc.wrapping_add(mix(word ^ (i + 1).wrapping_mul(GAMMA)))
    })
}

/// The checksum from the sum over all words and the arena's size in bytes.
pub fn finish(sum: u64, size: u64) -> u64 {
    mix(sum ^ size)
}

/// The checksum of a whole arena held in host memory.
pub fn arena_checksum(bytes: &[u8]) -> u64 {
    finish(partial_sum(bytes, 0), bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_add_up_in_any_split() {
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = partial_sum(&bytes, 0);
        let (a, b) = bytes.split_at(8 * 300);
        assert_eq!(whole, partial_sum(b, 300).wrapping_add(partial_sum(a, 0)));
    }

    #[test]
    fn moved_and_changed_words_change_it() {
        let mut bytes = vec![0u8; 4096];
        bytes[0] = 1;
        let original = arena_checksum(&bytes);
        let mut moved = vec![0u8; 4096];
        moved[8] = 1;
        assert_ne!(original, arena_checksum(&moved));
        bytes[4095] ^= 0x80;
        assert_ne!(original, arena_checksum(&bytes));
    }

    #[test]
    fn known_value() {
        // Pinned so that the kernel, the host and recorded manifests never drift apart.
        assert_eq!(arena_checksum(&[0u8; 8]), finish(mix(GAMMA), 8));
        assert_eq!(mix(0), 0);
    }
}
