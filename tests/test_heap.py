"""A rank's C heap (`hpcrl.heap`): freed step temporaries stay in the heap instead of being
handed back to the kernel and faulted in again on every step. Each case runs in its own
interpreter, since malloc's settings belong to the process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import subprocess_env

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's (mallopt)"
)

# Two 1 MiB arrays made and freed 200 times, as a rank's step makes its temporaries; prints
# the minor page faults the 200 took. Under glibc's own rule the heap is trimmed after each
# pair and grown again: about 2 MiB (512 pages) faulted in per pair.
CHURN = """
import resource, sys
import numpy as np
{setup}
n = 1 << 17
for _ in range(5):
    a = np.ones(n); b = np.ones(n); del a, b
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    a = np.ones(n); b = np.ones(n); del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
KEEP = "from hpcrl import heap; assert heap.keep_freed_memory()"


def churn_faults(setup: str = "", **env: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN.format(setup=setup)],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **env},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_freed_temporaries_are_not_faulted_in_again_on_every_step():
    assert churn_faults() > 200 * 256  # glibc's own rule: trimmed and regrown every pair
    assert churn_faults(KEEP) < 1000


def test_a_training_process_keeps_its_freed_memory(tmp_path):
    """`hpcrl.runner.train` sets the thresholds (a one-process tabular run, then the
    same churn in the same process)."""
    run = (
        "import hpcrl; hpcrl.train({'env_id': 'FrozenLake-v1', 'layout': 'allreduce', "
        "'total_env_steps': 2000, 'num_envs': 4, 'eval_episodes': 0}, "
        f"run_dir={str(tmp_path / 'run')!r})"
    )
    assert churn_faults(run) < 1000


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"MALLOC_MMAP_THRESHOLD_": "1000000"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
    ],
)
def test_the_users_own_malloc_settings_are_kept(env):
    code = "from hpcrl import heap; print(heap.keep_freed_memory())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **env},
        timeout=60,
    )
    assert done.stdout.split() == ["False"], done.stderr
