"""The linear demo's input generator in numpy (examples/linear/seeded.rs, README "Generator").

SplitMix64 seeded with n: ``state += 0x9E3779B97F4A7C15``, then
``z = (z ^ z>>30) * 0xBF58476D1CE4E5B9; z = (z ^ z>>27) * 0x94D049BB133111EB; z ^= z>>31``,
all modulo 2^64. Draw k uses ``state = n + k * 0x9E3779B97F4A7C15`` (k = 1, 2, ...), so the
whole vector is computed at once; numpy's uint64 arithmetic wraps modulo 2^64 as the generator
needs. Each draw becomes ``u = (z >> 40) / 2^23 - 1``, in [-1, 1) and exact in float32, so the
request ``{"seed": n}`` gets bit for bit the x the Rust worker uses.
"""

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def seeded_input(seed, n):
    """x of the request ``{"seed": seed}``: n float32 values in [-1, 1)."""
    if not 0 <= int(seed) < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), not {seed}")
    with np.errstate(over="ignore"):
        z = np.uint64(int(seed)) + GAMMA * np.arange(1, n + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 23) - np.float32(1.0)
