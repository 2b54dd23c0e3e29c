"""Atomic, checksummed checkpoints: `checkpoints/step-<N>.h5`, `checkpoints/latest.h5`, and
`checkpoints/best.h5` (the parameters of the best periodic evaluation; never resumed from).

A checkpoint holds numeric datasets (nested names such as `ranks/3/env_rng` become groups)
and one JSON attribute (`meta`, which carries `format_version`), never pickles. It is
written to `<name>.tmp.<pid>`, gets its `checksum` (SHA-256 of every dataset and of
`meta`) and a `complete` flag last, is fsynced and moved into place with `os.replace`;
`latest.h5` is a symlink swapped the same way. A crash therefore never leaves a
half-written checkpoint under a final name, and a damaged file fails its checksum.

A sharded checkpoint (layout `sharded`) has companions: every rank writes its own shard
of the Q-table as `step-<N>.shard-<k>.h5` (the same atomic, checksummed format) before
rank 0 writes `step-<N>.h5`, whose meta `shards` counts them. The step file is therefore
only ever complete after its shards; it counts as intact only if every shard does, and
shards are pruned and quarantined with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from hpcrl.errors import CheckpointError
from hpcrl.storage import space

LATEST = "latest.h5"
BEST = "best.h5"  # the best periodic evaluation's parameters (`write_best`)
FORMAT_VERSION = 1  # bump when a reader of the old layout would misread the new one
_STEP_FILE = re.compile(r"^step-(\d+)\.h5$")


class CheckpointFormatError(CheckpointError):
    """A checkpoint written by a newer hpcrl (higher `format_version`) than this one reads."""


def _checksum(arrays: dict[str, np.ndarray], meta_json: str) -> str:
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    ckpt_dir: str | Path, env_steps: int, arrays: dict[str, np.ndarray], meta: dict, keep: int
) -> Path:
    """Write `step-<env_steps>.h5` atomically, point `latest.h5` at it, keep the newest `keep`.

    Args:
        ckpt_dir: the run's `checkpoints/` directory.
        env_steps: global env steps at the checkpoint (names the file).
        arrays: {name: numeric array}, e.g. {"q_table": (n_states, n_actions) float64,
            "ranks/0/policy_rng": (6,) uint64}; a `/` in a name makes HDF5 groups.
        meta: JSON-serialisable counters and identity (algo, env_id, config, ...);
            `format_version` is added.
        keep: how many step files to keep (>= 1).

    Returns:
        The path of the new checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{env_steps}.h5"
    _write_atomic(final, arrays, meta)
    link_tmp = ckpt_dir / f"{LATEST}.tmp.{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, ckpt_dir / LATEST)
    _fsync_path(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        for shard in shard_files(old):
            shard.unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return final


def shard_path(step_file: str | Path, shard: int) -> Path:
    """`step-<N>.shard-<k>.h5`, shard k of the sharded checkpoint `step-<N>.h5`."""
    step_file = Path(step_file)
    return step_file.with_name(f"{step_file.stem}.shard-{shard}.h5")


def shard_files(step_file: str | Path) -> list[Path]:
    """The shard files present next to a step file (any count; see `shard_path`)."""
    step_file = Path(step_file)
    return sorted(step_file.parent.glob(f"{step_file.stem}.shard-*.h5"))


def write_shard(
    ckpt_dir: str | Path, env_steps: int, shard: int, arrays: dict[str, np.ndarray], meta: dict
) -> Path:
    """Write shard `shard` of the checkpoint at `env_steps` atomically (each rank its own,
    before rank 0 writes the step file with `write_checkpoint`)."""
    path = shard_path(Path(ckpt_dir) / f"step-{env_steps}.h5", shard)
    _write_atomic(path, arrays, {**meta, "shard": int(shard), "env_steps": int(env_steps)})
    return path


def write_best(ckpt_dir: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write `best.h5` atomically (the format of a step file): the parameters of the best
    periodic evaluation so far, for `hpcrl evaluate --checkpoint best`. It is never a
    resume point (`list_checkpoints` and `latest.h5` ignore it), so it holds no optimizer
    or rank state unless `arrays` does."""
    path = Path(ckpt_dir) / BEST
    _write_atomic(path, arrays, meta)
    _fsync_path(path.parent)
    return path


def _write_atomic(final: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """`final` written as `<name>.tmp.<pid>`, checksummed, fsynced, moved into place."""
    tmp = final.parent / f"{final.name}.tmp.{os.getpid()}"
    meta_json = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True)
    try:
        with space.guard(tmp):
            with h5py.File(tmp, "w") as f:
                for name, array in arrays.items():
                    f.create_dataset(name, data=np.asarray(array))
                f.attrs["meta"] = meta_json
                f.attrs["checksum"] = _checksum(arrays, meta_json)
                f.attrs["complete"] = True
            _fsync_path(tmp)
    except space.DiskFullError:
        tmp.unlink(missing_ok=True)  # the space back; `final` and `latest.h5` untouched
        raise
    os.replace(tmp, final)


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Step files in `ckpt_dir`, oldest first (by env steps)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        match = _STEP_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def remove_stale_temporaries(ckpt_dir: str | Path) -> list[Path]:
    """Delete `*.tmp.*` files left by a writer that died; returns what was removed."""
    removed = []
    for path in Path(ckpt_dir).glob("*.tmp.*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify one checkpoint.

    Returns:
        ({name: array}, meta dict).

    Raises:
        CheckpointError: missing, not HDF5, not `complete`, or checksum mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise CheckpointError(f"checkpoint {str(path)!r} is incomplete")
            meta_json = str(f.attrs["meta"])
            stored = str(f.attrs["checksum"])
            arrays = {}
            f.visititems(
                lambda name, obj: (
                    arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
                )
            )
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        # RuntimeError: HDF5's own structures damaged (e.g. "Object visitation failed").
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    if _checksum(arrays, meta_json) != stored:
        raise CheckpointError(f"checkpoint {str(path)!r} fails its checksum (corrupted)")
    meta = json.loads(meta_json)
    version = int(meta.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} has format version {version}, newer than the "
            f"{FORMAT_VERSION} this hpcrl reads: upgrade hpcrl to resume it"
        )
    for shard in range(int(meta.get("shards", 0))):
        # One shard in memory at a time (a sharded table may not fit one process).
        _, shard_meta = load_checkpoint(shard_path(path, shard))
        if int(shard_meta.get("env_steps", -1)) != int(meta["env_steps"]):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: its shard {shard} is of another checkpoint"
            )
    return arrays, meta


def load_newest_intact(
    ckpt_dir: str | Path,
) -> tuple[dict[str, np.ndarray], dict, Path, list[str]]:
    """Load the newest step file that passes its checks, skipping damaged newer ones.

    Returns:
        (arrays, meta, path, skipped): `skipped` holds (path, reason) for every damaged
        newer file, for the caller to warn about and quarantine.

    Raises:
        CheckpointError: no step file in `ckpt_dir`, or none intact (the message names each
            file and what is wrong with it).
        CheckpointFormatError: the newest readable checkpoint has a newer format (no
            fallback: an older checkpoint would silently lose progress).
    """
    steps = list_checkpoints(ckpt_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {str(ckpt_dir)!r}")
    skipped: list[tuple[Path, str]] = []
    for path in reversed(steps):
        try:
            arrays, meta = load_checkpoint(path)
        except CheckpointFormatError:
            raise
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        return arrays, meta, path, skipped
    reasons = "; ".join(reason for _, reason in skipped)
    raise CheckpointError(f"no intact checkpoint in {str(ckpt_dir)!r}: {reasons}")


def read_shared(path: str | Path) -> dict[str, np.ndarray]:
    """Every dataset of a verified checkpoint outside `ranks/` (e.g. `q_table`,
    `params/...`, `optimizer/...`), keyed by its full path."""
    arrays: dict[str, np.ndarray] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and not name.startswith("ranks/"):
            arrays[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


def read_group(path: str | Path, group: str) -> dict[str, np.ndarray]:
    """The datasets directly under `group` of a checkpoint already verified by
    `load_checkpoint` (e.g. one rank's `ranks/<k>`); {} when the group is absent."""
    with h5py.File(path, "r") as f:
        if group not in f:
            return {}
        return {name: obj[()] for name, obj in f[group].items() if isinstance(obj, h5py.Dataset)}


def read_rank_values(path: str | Path, name: str) -> dict[int, np.ndarray]:
    """{rank: `ranks/<rank>/<name>`} of a verified checkpoint, for the ranks that hold it
    (a small dataset such as `env_captured`, without reading the rest of each state)."""
    with h5py.File(path, "r") as f:
        ranks = f.get("ranks", {})
        return {int(k): g[name][()] for k, g in ranks.items() if name in g}


def quarantine(paths: list[Path]) -> list[Path]:
    """Rename damaged step files to `<name>.corrupt`, out of the rotation (kept for a
    post-mortem); returns the new paths."""
    moved = []
    for path in paths:
        for shard in shard_files(path):
            os.replace(shard, shard.with_name(shard.name + ".corrupt"))
        target = path.with_name(path.name + ".corrupt")
        os.replace(path, target)
        moved.append(target)
    return moved


def load_latest(ckpt_dir: str | Path) -> tuple[dict[str, np.ndarray], dict, Path]:
    """Load `latest.h5` (or the newest step file when the link is missing).

    Raises:
        CheckpointError: no checkpoint in `ckpt_dir`, or the newest one is damaged.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.exists():
        path = latest.resolve()
    else:
        steps = list_checkpoints(ckpt_dir)
        if not steps:
            raise CheckpointError(f"no checkpoint in {str(ckpt_dir)!r}")
        path = steps[-1]
    arrays, meta = load_checkpoint(path)
    return arrays, meta, path
