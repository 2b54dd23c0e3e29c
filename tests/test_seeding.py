"""`hpcrl.seeding.np_random_generators` gives the generators gymnasium's `np_random` gives."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from gymnasium import error
from gymnasium.utils import seeding

from hpcrl.seeding import _pcg64_seed_words, np_random_generators

EDGES = [0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1, 2**64, 2**70 + 3]


def test_every_generator_has_np_randoms_state_and_stream():
    rng = np.random.default_rng(0)
    seeds = EDGES + list(range(10_000, 10_500)) + [int(s) for s in rng.integers(0, 2**63, 500)]
    made = np_random_generators(seeds)
    assert len(made) == len(seeds)
    for seed, generator in zip(seeds, made, strict=True):
        reference = seeding.np_random(seed)[0]
        assert generator.bit_generator.state == reference.bit_generator.state, seed
        np.testing.assert_array_equal(generator.random(5), reference.random(5))


def test_seed_words_are_seedsequences_for_one_and_two_word_seeds():
    seeds = [0, 7, 2**32 - 1, 2**32, 2**64 - 1]
    words = _pcg64_seed_words(np.array(seeds, dtype=np.uint64))
    for seed, row in zip(seeds, words, strict=True):
        expected = np.random.SeedSequence(seed).generate_state(4, np.uint64)
        np.testing.assert_array_equal(row, expected)


def test_none_gives_an_unseeded_generator_and_bad_seeds_are_refused_as_gymnasium_does():
    made = np_random_generators([None, 3])
    assert isinstance(made[0], np.random.Generator)
    assert made[1].bit_generator.state == seeding.np_random(3)[0].bit_generator.state
    with pytest.raises(error.Error, match="greater or equal to zero"):
        np_random_generators([1, -1])
    with pytest.raises(error.Error, match="python integer"):
        np_random_generators([1.5])


def test_the_cyclic_collector_is_left_as_it_was():
    """The generators are made with the collector paused; it is on again after (and stays
    off for a caller that had turned it off)."""
    assert gc.isenabled()
    np_random_generators(range(100))
    assert gc.isenabled()
    gc.disable()
    try:
        np_random_generators(range(100))
        assert not gc.isenabled()
    finally:
        gc.enable()
