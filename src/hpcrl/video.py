"""Videos of a checkpoint's greedy policy: `hpcrl evaluate RUN_DIR --video DIR` (issue 15).

One plain process (rank 0 under `mpirun`) makes the run's env with
`render_mode="rgb_array"`, wraps it in gymnasium's `RecordVideo` and plays `episodes` greedy
episodes of the policy `evaluate` runs, episode i reset with `seed + i` as in `evaluate`
(so video episode 0 is evaluation episode 0). Each episode is one H.264 `.mp4`,
`<checkpoint>-episode-<i>.mp4` (e.g. `step-2048-episode-0.mp4`), holding `length + 1`
frames: the reset frame, then one per env step. A file of the same name is replaced.

Needs the `video` extra (moviepy, and pygame for the toy-text, classic-control and Box2D
renderers): `pip install 'hpcrl[video]'`.

- Frames are written by moviepy's ffmpeg writer, one by one: `RecordVideo`'s own writer
  (moviepy's `ImageSequenceClip`) drops the last frame, the end of the episode, whenever
  the float sum of the frame durations falls below `n / fps` (moviepy issue #2507, e.g.
  13 frames at 50 fps).
- `RecordVideo` keeps an episode's frames in memory until it ends: a full 500-step CartPole
  episode (600 x 400) holds about 360 MB.
- Atari (`ALE/...` with the preprocessing): the video shows the full-colour 210 x 160
  screen, not the 84 x 84 grayscale observation, once per agent step (every 4th emulator
  frame), at 15 fps, i.e. in real time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import numpy as np

from hpcrl.errors import UserError, first_line

EXTRA = "pip install 'hpcrl[video]'"
ATARI_EMULATOR_FPS = 60  # the Atari 2600's frame rate (NTSC)
MAX_EPISODE_STEPS = 10_000  # envs without a time limit: the cap `evaluate` uses


def check_request(video_dir: str | Path, episodes: int = 1, seed: int = 0) -> Path:
    """What can be checked before a checkpoint is read: the arguments, the output directory
    and moviepy (the CLI runs it before the evaluation, so a bad `--video` fails at once).

    Returns:
        The absolute video directory (not created yet).

    Raises:
        UserError: `episodes` < 1, `seed` < 0, `video_dir` (or a parent) is a file or is
            not writable, or moviepy is not installed.
    """
    if episodes < 1:
        raise UserError(f"--video-episodes {episodes}: expected an integer >= 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: expected an integer >= 0")
    path = Path(video_dir).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"--video {str(video_dir)!r}: is a file; expected a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--video {str(video_dir)!r}: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--video {str(video_dir)!r}: {str(existing)!r} is not writable")
    _moviepy_writer()
    return path


def record_video(
    run_dir: str | Path,
    video_dir: str | Path,
    checkpoint: str = "latest",
    episodes: int = 1,
    seed: int = 0,
) -> dict:
    """Record `episodes` greedy episodes of a checkpoint's policy, one `.mp4` each.

    Args:
        run_dir: a run directory written by `train`.
        video_dir: where the videos go (created, with its parents, if missing).
        checkpoint: "latest", "best" or "step-N", as for `evaluate` and `load_policy`.
        episodes: episodes to record (>= 1); episode i resets with `seed + i`.
        seed: base seed (>= 0).

    Returns:
        JSON-ready `{"video_dir", "files", "frames", "returns", "lengths", "fps",
        "checkpoint", "episodes"}`: absolute paths of the `.mp4` files in episode order,
        their frame counts (`lengths[i] + 1`), the undiscounted returns and env steps of
        the episodes, the frame rate and the checkpoint file played.

    Raises:
        UserError: as `check_request`; no run or no such checkpoint (as `evaluate`); an
            env that does not render `rgb_array` frames, or a renderer whose package is
            missing (pygame: the `video` extra is named).
    """
    from hpcrl.envs import ATARI_FRAME_SKIP, make_env
    from hpcrl.policy import load_policy

    out = check_request(video_dir, episodes, seed)
    policy = load_policy(run_dir, checkpoint)
    run, path = policy.config.run, policy.checkpoint
    env = make_env(run.env_id, {**run.env_kwargs, "render_mode": "rgb_array"}, **run.env_options())
    if env.render_mode != "rgb_array":
        modes = env.metadata.get("render_modes", [])
        env.close()
        raise UserError(
            f"--video: env {run.env_id!r} does not render rgb_array frames "
            f"(its render_modes: {modes}): no video can be made of it"
        )
    fps = None  # RecordVideo: the env's metadata["render_fps"]
    if run.env_id.startswith("ALE/") and run.atari_preprocessing:
        fps = ATARI_EMULATOR_FPS // ATARI_FRAME_SKIP  # one frame per agent step: real time
    limit = (env.spec.max_episode_steps if env.spec else None) or MAX_EPISODE_STEPS
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        env.close()
        raise UserError(f"--video {str(video_dir)!r}: cannot create it: {exc.strerror}") from None
    recorder = _ExactRecordVideo(env, out, Path(path).stem, fps)
    try:
        with _headless_pygame():
            returns, lengths = _play(recorder, policy.act, episodes, seed, limit)
            recorder.close()  # writes the last episode's file
    except gym.error.DependencyNotInstalled as exc:
        recorder.discard()
        raise _missing_renderer(run.env_id, exc) from None
    except BaseException:
        recorder.discard()
        raise
    return {
        "video_dir": str(out),
        "files": [file for file, _ in recorder.written],
        "frames": [frames for _, frames in recorder.written],
        "returns": returns,
        "lengths": lengths,
        "fps": recorder.frames_per_sec,
        "checkpoint": str(Path(path).absolute()),
        "episodes": episodes,
    }


def _play(env, act, episodes: int, seed: int, limit: int) -> tuple[list[float], list[int]]:
    """Returns and lengths (env steps) of `episodes` episodes of the deterministic `act`,
    episode i reset with `seed + i` and cut after `limit` steps (as `evaluate` plays them)."""
    returns, lengths = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, steps = 0.0, 0
        while steps < limit:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total, steps = total + float(reward), steps + 1
            if terminated or truncated:
                break
        returns.append(total)
        lengths.append(steps)
    return returns, lengths


class _ExactRecordVideo(gym.wrappers.RecordVideo):
    """`RecordVideo` that writes every frame it captured (see the module docstring) and
    keeps `written`: [(path, frames)], in episode order."""

    def __init__(self, env: gym.Env, video_dir: Path, name_prefix: str, fps: int | None):
        with warnings.catch_warnings():
            # "Overwriting existing videos at ...": said whenever the directory exists.
            warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
            super().__init__(
                env,
                str(video_dir),
                episode_trigger=lambda episode: True,
                name_prefix=name_prefix,
                fps=fps,
            )
        self.written: list[tuple[str, int]] = []

    def stop_recording(self) -> None:
        if self.recorded_frames:
            file = os.path.join(self.video_folder, f"{self._video_name}.mp4")
            _write_mp4(file, self.recorded_frames, self.frames_per_sec)
            self.written.append((file, len(self.recorded_frames)))
        self.recorded_frames = []
        self.recording = False
        self._video_name = None

    def discard(self) -> None:
        """Close without writing the episode being recorded (after an error)."""
        self.recorded_frames = []
        self.recording = False
        self.env.close()


def _write_mp4(file: str, frames: list[np.ndarray], fps: float) -> None:
    """Every frame, in order, into an H.264 `.mp4` (yuv420p: plays everywhere).

    Args:
        frames: (H, W, 3) uint8 RGB images, all the same size; odd sizes are padded by one
            edge row or column (yuv420p needs even sizes).
    """
    writer_class = _moviepy_writer()
    height, width = frames[0].shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    size = (width + width % 2, height + height % 2)
    with writer_class(file, size, fps, codec="libx264") as writer:
        for frame in frames:
            frame = np.asarray(frame, dtype=np.uint8)[..., :3]
            writer.write_frame(np.ascontiguousarray(np.pad(frame, pad, mode="edge")))


def _moviepy_writer():
    try:
        from moviepy.video.io.ffmpeg_writer import FFMPEG_VideoWriter
    except ImportError:
        raise UserError(f"--video needs moviepy, which is not installed: {EXTRA}") from None
    return FFMPEG_VideoWriter


def _missing_renderer(env_id: str, exc: BaseException) -> UserError:
    import importlib.util

    if importlib.util.find_spec("pygame") is None:
        return UserError(f"--video: rendering {env_id!r} needs pygame, not installed: {EXTRA}")
    first = first_line(exc) or type(exc).__name__
    return UserError(f"--video: rendering {env_id!r} needs a package that is missing: {first}")


@contextmanager
def _headless_pygame() -> Iterator[None]:
    """pygame's dummy display while frames are rendered: `rgb_array` draws off-screen, and
    SDL's probe of a real display prints "error: XDG_RUNTIME_DIR is invalid" on a node
    without one. The caller's setting comes back afterwards (a later `human` window)."""
    before = os.environ.get("SDL_VIDEODRIVER")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SDL_VIDEODRIVER", None)
