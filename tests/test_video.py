"""`hpcrl evaluate RUN_DIR --video DIR` (issue 15): the .mp4 of the greedy policy, checked
by its size, frame count and first frame with moviepy (the library that wrote it), and its
refusals: each one line, exit status 2, every rank ending."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import hpcrl_command, one_error_line, subprocess_env
from hpcrl.errors import UserError

TIMEOUT_S = 120  # no CLI call here needs more than a few seconds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A PPO run on CartPole-v1 (one process, about 2 s of training)."""
    path = tmp_path_factory.mktemp("video") / "run"
    cmd = hpcrl_command(
        None, "train", "--algo", "ppo", "--env", "CartPole-v1", "--total-env-steps", "2048",
        "--run-dir", str(path), "--set", "eval_episodes=0",
    )  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(), timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=TIMEOUT_S
    )


def _show(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _decoded_frames(path: str) -> int:
    """Frames in the file, every one decoded by moviepy's ffmpeg. (moviepy's own
    `n_frames` is int(duration x fps) with the duration rounded to 10 ms by ffmpeg's
    report: 29 frames at 50 fps read as 28.)"""
    from moviepy.config import FFMPEG_BINARY

    cmd = [FFMPEG_BINARY, "-hide_banner", "-i", path, "-map", "0:v:0", "-f", "null", "-"]
    report = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S).stderr
    counts = re.findall(r"frame=\s*(\d+)", report)
    assert counts, report
    return int(counts[-1])


def _reset_frame(seed: int) -> np.ndarray:
    """CartPole-v1's rendered frame after `reset(seed=seed)`: (400, 600, 3) uint8."""
    import gymnasium as gym

    env = gym.make("CartPole-v1", render_mode="rgb_array")
    env.reset(seed=seed)
    frame = env.render()
    env.close()
    return frame


@pytest.mark.e2e
def test_evaluate_writes_a_video_of_the_evaluated_episodes(run_dir, tmp_path, monkeypatch):
    from moviepy import VideoFileClip

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # _reset_frame: pygame off-screen

    video_dir = tmp_path / "videos" / "new"  # parents created too
    cmd = hpcrl_command(
        2, "evaluate", str(run_dir), "--episodes", "2", "--seed", "5",
        "--video", str(video_dir), "--video-episodes", "2",
    )  # fmt: skip
    result = _run(cmd)
    assert result.returncode == 0, _show(result)
    out = json.loads(result.stdout)  # one JSON object: rank 0 alone prints
    video = out["video"]
    assert video["video_dir"] == str(video_dir)
    assert video["episodes"] == 2
    assert Path(video["checkpoint"]).name == "step-2048.h5"
    names = [f"step-2048-episode-{i}.mp4" for i in range(2)]
    assert video["files"] == [str(video_dir / name) for name in names]
    assert sorted(p.name for p in video_dir.iterdir()) == names
    # Episode i of the video is episode i of the evaluation (seed 5 + i): same returns.
    assert np.mean(video["returns"]) == pytest.approx(out["mean_return"], abs=1e-9)
    for i, file in enumerate(video["files"]):
        assert os.path.getsize(file) > 2500, file  # 9 frames: 2.9 kB; 1 frame: 1.9 kB
        # CartPole pays 1 per step: the reset frame, then one frame per step.
        assert video["returns"][i] == video["lengths"][i] >= 8
        assert _decoded_frames(file) == video["lengths"][i] + 1 == video["frames"][i]
        clip = VideoFileClip(file)
        try:
            assert list(clip.size) == [600, 400] and clip.fps == 50 == video["fps"]
            assert clip.duration == pytest.approx((video["lengths"][i] + 1) / 50, abs=0.021)
            first = clip.get_frame(0).astype(np.int16)
        finally:
            clip.close()
        # The first frame is the env's reset(seed=5 + i), up to the H.264 compression.
        differs = np.abs(first - _reset_frame(5 + i)).max(axis=2) > 64
        assert differs.mean() < 2e-4, f"episode {i}: {differs.mean():.4%} of the pixels differ"


@pytest.mark.e2e
def test_a_regular_file_as_video_dir_is_refused_before_the_evaluation(run_dir, tmp_path):
    target = tmp_path / "not-a-dir.mp4"
    target.write_bytes(b"keep me")
    # --episodes 0, which the evaluation refuses: the --video error comes first.
    cmd = hpcrl_command(2, "evaluate", str(run_dir), "--episodes", "0", "--video", str(target))
    result = _run(cmd)
    assert result.returncode == 2, _show(result)
    one_error_line(
        result.stdout, result.stderr, [r"--video", re.escape(str(target))], _show(result)
    )
    assert target.read_bytes() == b"keep me"


@pytest.mark.e2e
def test_a_bad_checkpoint_with_video_is_one_line_and_creates_no_directory(run_dir, tmp_path):
    video_dir = tmp_path / "videos"
    cmd = hpcrl_command(
        None, "evaluate", str(run_dir), "--checkpoint", "step-7", "--video", str(video_dir)
    )
    result = _run(cmd)
    assert result.returncode == 2, _show(result)
    one_error_line(result.stdout, result.stderr, [r"step-7", r"step-2048\.h5"], _show(result))
    assert not video_dir.exists()


@pytest.mark.e2e
def test_missing_moviepy_names_the_video_extra_on_every_rank(run_dir, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['moviepy'] = None\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hide), env.get("PYTHONPATH")]))
    video_dir = tmp_path / "videos"
    # --episodes 0, which the evaluation refuses: the moviepy error comes first.
    cmd = hpcrl_command(2, "evaluate", str(run_dir), "--episodes", "0", "--video", str(video_dir))
    result = _run(cmd, env)
    assert result.returncode == 2, _show(result)
    patterns = [r"moviepy", re.escape("pip install 'hpcrl[video]'")]
    one_error_line(result.stdout, result.stderr, patterns, _show(result))
    assert not video_dir.exists()


@pytest.mark.e2e
def test_missing_pygame_names_the_video_extra_and_leaves_no_file(run_dir, tmp_path, monkeypatch):
    from hpcrl.video import record_video

    monkeypatch.setitem(sys.modules, "pygame", None)  # `import pygame` raises ImportError
    with pytest.raises(UserError) as exc:
        record_video(run_dir, tmp_path / "videos")
    message = str(exc.value)
    assert "\n" not in message
    assert "pygame" in message and "pip install 'hpcrl[video]'" in message, message
    assert list((tmp_path / "videos").iterdir()) == []


@pytest.mark.parametrize(
    ("make", "episodes", "seed", "expected"),
    [
        (lambda tmp: tmp / "new" / "deeper", 0, 0, r"--video-episodes 0: expected an integer >= 1"),
        (lambda tmp: tmp / "new", 1, -1, r"--seed -1: expected an integer >= 0"),
        (lambda tmp: _file(tmp / "f"), 1, 0, r"is a file; expected a directory"),
        (lambda tmp: _file(tmp / "f") / "sub", 1, 0, r"/f' is a file"),
    ],
    ids=["zero-episodes", "negative-seed", "dir-is-a-file", "parent-is-a-file"],
)
def test_check_request_refuses_bad_arguments(tmp_path, make, episodes, seed, expected):
    from hpcrl.video import check_request

    with pytest.raises(UserError, match=expected):
        check_request(make(tmp_path), episodes, seed)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["f"])


def test_check_request_accepts_a_new_or_existing_directory(tmp_path):
    from hpcrl.video import check_request

    assert check_request(tmp_path) == tmp_path
    assert check_request(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checked, not created


def _file(path: Path) -> Path:
    path.write_text("x")
    return path
