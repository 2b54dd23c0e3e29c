"""Random-generator, model and optimizer states as numeric arrays, so checkpoints stay
numeric HDF5 (no pickles).

numpy's `default_rng` and gymnasium's `np_random` are `Generator(PCG64)`; a PCG64 state
is two 128-bit integers plus the buffered-uint32 pair, stored here as six uint64:
`[state_hi, state_lo, inc_hi, inc_lo, has_uint32, uinteger]`. torch's CPU generator
state is its own uint8 tensor.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

_MASK64 = (1 << 64) - 1


# numpy's PCG64 (XSL-RR 128/64) steps its 128-bit state s -> a s + inc (mod 2^128) once per
# 64-bit draw, with this multiplier (numpy `random/src/pcg64/pcg64.h`,
# PCG_DEFAULT_MULTIPLIER_HIGH and _LOW; O'Neill 2014, "PCG: A Family of Simple Fast
# Space-Efficient Statistically Good Algorithms for Random Number Generation").
_PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_MASK128 = (1 << 128) - 1


@functools.lru_cache(maxsize=8)
def _pcg64_back(draws: int) -> tuple[int, int]:
    """(a^-draws, 1 + a + ... + a^(draws-1)) mod 2^128 for the PCG64 multiplier a."""
    total, power = 0, 1
    for _ in range(draws):
        total, power = (total + power) & _MASK128, (power * _PCG64_MULTIPLIER) & _MASK128
    return pow(power, -1, 1 << 128), total


def generator_state_before(rng: np.random.Generator, draws: int) -> np.ndarray:
    """The state of a PCG64 `Generator` as it was `draws` 64-bit draws ago, as (6,) uint64
    (`generator_state`); `rng` is not changed. One float64 of `Generator.random` is one
    64-bit draw, and leaves the buffered uint32 alone. After k steps of the generator's
    linear congruence, s_k = a^k s_0 + inc (1 + a + ... + a^(k-1)) mod 2^128, so
    s_0 = a^-k (s_k - inc (1 + ... + a^(k-1))): the jump of Brown (1994), "Random number
    generation with arbitrary strides", backwards (PCG64.advance jumps forwards; this
    takes 2 us a copy, not 11).

    Raises:
        TypeError: the generator's bit generator is not PCG64.
    """
    state = rng.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise TypeError(f"cannot capture a {state['bit_generator']} generator: expected PCG64")
    now, inc = state["state"]["state"], state["state"]["inc"]
    inverse, total = _pcg64_back(draws)
    s = (inverse * (now - inc * total)) & _MASK128
    return np.array(
        [s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, state["has_uint32"], state["uinteger"]],
        dtype=np.uint64,
    )


def generator_state(rng: np.random.Generator) -> np.ndarray:
    """The state of a PCG64 `Generator` as (6,) uint64 (`generator_state_before` 0 draws).

    Raises:
        TypeError: the generator's bit generator is not PCG64.
    """
    return generator_state_before(rng, 0)


def set_generator_state(rng: np.random.Generator, array: np.ndarray) -> None:
    """Restore a PCG64 `Generator` from the (6,) uint64 of `generator_state`."""
    a = [int(x) for x in np.asarray(array, dtype=np.uint64)]
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (a[0] << 64) | a[1], "inc": (a[2] << 64) | a[3]},
        "has_uint32": a[4],
        "uinteger": a[5],
    }


def torch_rng_state() -> np.ndarray | None:
    """torch's CPU generator state as uint8, or None when this rank never imported torch
    (tabular ranks do not)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return torch.get_rng_state().numpy().copy()


def set_torch_rng_state(array: np.ndarray | None) -> None:
    if array is None or len(array) == 0:
        return
    import torch

    torch.set_rng_state(torch.from_numpy(np.asarray(array, dtype=np.uint8).copy()))


def module_arrays(module, prefix: str = "params") -> dict[str, np.ndarray]:
    """Every parameter and buffer of a torch module as `{prefix/<name>: array}`."""
    return {
        f"{prefix}/{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()
    }


def load_module_arrays(module, arrays: dict[str, np.ndarray], prefix: str = "params") -> None:
    """Inverse of `module_arrays` (strict: every key must be there).

    Raises:
        KeyError: an entry of the module is missing from `arrays`.
    """
    import torch

    state = {}
    for key, value in module.state_dict().items():
        state[key] = torch.as_tensor(arrays[f"{prefix}/{key}"], dtype=value.dtype)
    module.load_state_dict(state)


def optimizer_arrays(optimizer, prefix: str = "optimizer") -> dict[str, np.ndarray]:
    """A torch optimizer's per-parameter state (e.g. Adam's step, exp_avg, exp_avg_sq) as
    `{prefix/<param index>/<name>: array}`; hyperparameters are config, not state."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            out[f"{prefix}/{index}/{name}"] = array.copy()
    return out


def load_optimizer_arrays(optimizer, arrays: dict[str, np.ndarray], prefix: str = "optimizer"):
    """Inverse of `optimizer_arrays` for an optimizer built over the same parameters."""
    import torch

    current = optimizer.state_dict()
    state: dict = {}
    for key, array in arrays.items():
        if not key.startswith(prefix + "/"):
            continue
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = torch.as_tensor(array)
    current["state"] = state
    optimizer.load_state_dict(current)
