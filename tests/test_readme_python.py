"""The README's "Use it from Python" section runs as written (issue 15): its python code
blocks, in order, as one script in a fresh directory, in a plain `python` process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

README = Path(__file__).parents[1] / "README.md"


def section_code(title: str) -> list[str]:
    """The ```python blocks of the README section `## title`, in order."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_code_for_train_networks_and_policies():
    code = "\n".join(section_code("Use it from Python"))
    for call in ("hpcrl.train(", "env_fn=", "network_fn=", "hpcrl.load_policy(", "load_runs("):
        assert call in code, call


@pytest.mark.e2e
def test_use_it_from_python_runs_as_written(tmp_path):
    blocks = section_code("Use it from Python")
    assert len(blocks) >= 3
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("completed runs/from-python {'mean_return'") for line in lines)
    assert any(line.startswith("return ") for line in lines), result.stdout
    assert (tmp_path / "runs" / "from-python" / "run.h5").exists()
    assert (tmp_path / "runs" / "dqn-own-network" / "run.h5").exists()
    assert "hpcrl_env_fn/make_sim" in result.stdout  # the runs table printed
