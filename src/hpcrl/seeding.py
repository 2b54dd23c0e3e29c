"""gymnasium's per-env generators for many seeds at once.

`gymnasium.utils.seeding.np_random(seed)` is `Generator(PCG64(SeedSequence(seed)))`. Made
one at a time that costs about 6 us a seed, most of it `SeedSequence` hashing the seed
and drawing PCG64's four seed words from its pool in Python-level calls: 50 ms for the
8,192 copies of a table-stepped env (`hpcrl.table_vector`), every time a rank starts.
`np_random_generators` does the hashing for all seeds together in numpy uint32
arithmetic, then hands each PCG64 its four words (about 1.2 us a seed), so each
generator's state is the one `np_random` gives (`tests/test_seeding.py`).

Source: numpy 2.x `numpy/random/bit_generator.pyx` (`SeedSequence`: `mix_entropy`,
`hashmix`, `mix`, `generate_state`, `_coerce_to_uint32_array`; after M. E. O'Neill's
`seed_seq_fe`, "Developing a seed_seq Alternative", 2015) and `_pcg64.pyx` (`PCG64`
seeds itself from `generate_state(4, uint64)`).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np
from gymnasium.utils import seeding
from numpy.random.bit_generator import ISeedSequence

# SeedSequence's constants (numpy bit_generator.pyx); arithmetic is mod 2^32.
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL_SIZE = 4
_MASK32 = 0xFFFFFFFF


class _SeedWords(ISeedSequence):
    """A seed sequence that is only its PCG64 seed words, (4,) uint64, as computed."""

    __slots__ = ("words",)

    def __init__(self, words: np.ndarray):
        self.words = words

    def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
        if n_words != _POOL_SIZE or np.dtype(dtype) != np.uint64:  # only PCG64 asks
            raise ValueError(f"seed words for PCG64 only: asked {n_words} {np.dtype(dtype)}")
        return self.words


def np_random_generators(seeds: Sequence[int]) -> list[np.random.Generator]:
    """`[gymnasium.utils.seeding.np_random(s)[0] for s in seeds]`, the same generator
    states, with the seed hashing done for all seeds at once.

    Args:
        seeds: (B,) Python ints >= 0. Seeds of 2^64 and above (more than two 32-bit
            entropy words) and None are passed to `np_random` one at a time.

    Returns:
        B `Generator(PCG64)`s; their `bit_generator.seed_seq` is not a `SeedSequence`.

    Raises:
        gymnasium.error.Error: a seed that is not a non-negative int (as `np_random`).
    """
    seeds = list(seeds)
    out: list[np.random.Generator | None] = [None] * len(seeds)
    fast = [
        i
        for i, s in enumerate(seeds)
        if isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 64
    ]
    for i in sorted(set(range(len(seeds))) - set(fast)):
        out[i] = seeding.np_random(seeds[i])[0]
    if fast:
        values = np.array([seeds[i] for i in fast], dtype=np.uint64)
        words = _pcg64_seed_words(values)
        # Three tracked objects a seed (Generator, PCG64, its lock) and no cycles: with the
        # cyclic collector paused, 8,192 of them take 10 ms, not 10-20 ms of collections.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for k, i in enumerate(fast):
                out[i] = np.random.Generator(np.random.PCG64(_SeedWords(words[k])))
        finally:
            if was_enabled:
                gc.enable()
    return out


def _pcg64_seed_words(seeds: np.ndarray) -> np.ndarray:
    """(B,) uint64 seeds -> (B, 4) uint64: `SeedSequence(seed).generate_state(4, uint64)`."""
    low = (seeds & np.uint64(_MASK32)).astype(np.uint32)
    high = (seeds >> np.uint64(32)).astype(np.uint32)
    # _coerce_to_uint32_array: an int's 32-bit words, least significant first; a seed
    # below 2^32 (0 included) is one word, so the pool's second entropy word is 0 and
    # the entropy ends there. Only the assembled length differs, not the pool's words:
    # mix_entropy pads a short entropy with hashmix(0), which a zero word also gives.
    entropy = [low, high, np.zeros_like(low), np.zeros_like(low)]
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = value * np.uint32(hash_const)
        return value ^ (value >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> np.uint32(16))

    pool = [hashmix(entropy[i]) for i in range(_POOL_SIZE)]
    for i_src in range(_POOL_SIZE):
        for i_dst in range(_POOL_SIZE):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    # generate_state(4, uint64): 8 uint32 words cycling over the pool, paired little-endian
    hash_const = _INIT_B
    state = []
    for i in range(2 * _POOL_SIZE):
        value = pool[i % _POOL_SIZE] ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_B) & _MASK32
        value = value * np.uint32(hash_const)
        state.append(value ^ (value >> np.uint32(16)))
    words = np.empty((len(seeds), _POOL_SIZE), dtype=np.uint64)
    for j in range(_POOL_SIZE):
        words[:, j] = state[2 * j].astype(np.uint64) | (
            state[2 * j + 1].astype(np.uint64) << np.uint64(32)
        )
    return words
