"""Wall time to solve CartPole-v1: hpcrl PPO against Stable-Baselines3 PPO, same machine.

Both use RL Baselines3 Zoo's CartPole-v1 PPO hyperparameters (hyperparams/ppo.yml: 8 envs x
32 steps, batch 256, 20 epochs, gamma 0.98, gae_lambda 0.8, ent_coef 0, learning rate and
clip range linear from 1e-3 and 0.2 to 0): 20 gradient steps of 256 samples per 256 env
steps. For each seed, one after the other so machine noise hits all alike (`--runs`):

- `sb3`: `PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=S), ...)`, one
  process, `--sb3-threads` torch threads (default 1), in benchmarks/.sb3-venv (made on first
  use: stable-baselines3, our torch pinned, our gymnasium);
- `hpcrl2`: `mpiexec -n 2 python -m hpcrl train configs/cartpole-ppo.yaml --set num_envs=4
  --set env_steps_per_update=256 --set minibatch_size=256 --set update_epochs=20 --set
  learning_rate=0.001 --set eval_episodes=0` (2 ranks x 4 env copies, 1 torch thread each);
- `hpcrl1`: the same on 1 rank with `num_envs=8`;
- `hpcrl2-sb3loss` (not by default): `hpcrl2` with SB3's value loss, `clip_vloss=false`
  (SB3's `clip_range_vf=None`) and `vf_coef=1.0` (SB3's 0.5 x MSE = our 1.0 x 0.5 MSE),
  which is the Zoo's value loss in our convention; `hpcrl1-sb3loss` the same on 1 rank;
- `hpcrl1-native`: `hpcrl1-sb3loss` with `vector_env=native` (gymnasium's numpy
  CartPole vector env, `hpcrl.native_vector`): hpcrl's fastest setting here.

Per run: env steps and seconds (hpcrl: run.h5's `episodes/wall_time`; SB3: the same
clock, from before `make_vec_env`: both include env, model and optimizer setup, ~1.5 s
here, mostly the first optimizer's import of `torch._dynamo`) when the mean return of the
last 20 training episodes first reaches 475 (as benchmarks/learning.py), the final mean,
training seconds and env steps/s for the whole budget, and the process's wall seconds and
CPU seconds over all its processes (imports and MPI start included; CPU is less sensitive
to other load). Ratio = SB3's median seconds to 475 / hpcrl's (and per seed).

Usage: python benchmarks/sb3_compare.py [--seeds 5] [--budget 100000] [--sb3-threads 1]
           [--runs sb3,hpcrl1-native,hpcrl1] [--out benchmarks/sb3_compare.json]
Prints a Markdown table for benchmarks/RESULTS.md and writes every run's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import TARGET, WINDOW, median_or_none  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SB3_VENV = REPO / "benchmarks" / ".sb3-venv"
HPCRL_SETS = ["env_steps_per_update=256", "minibatch_size=256", "update_epochs=20",
              "learning_rate=0.001", "eval_episodes=0"]  # fmt: skip
RUNS = {  # --runs name: (table label, ranks, extra --set for hpcrl; None: SB3)
    "sb3": ("SB3 PPO, 1 process", 1, None),
    "hpcrl2": ("hpcrl PPO, 2 ranks", 2, []),
    "hpcrl1": ("hpcrl PPO, 1 rank", 1, []),
    "hpcrl2-sb3loss": ("hpcrl PPO, 2 ranks, SB3's value loss", 2,
                       ["clip_vloss=false", "vf_coef=1.0"]),
    "hpcrl1-sb3loss": ("hpcrl PPO, 1 rank, SB3's value loss", 1,
                       ["clip_vloss=false", "vf_coef=1.0"]),
    "hpcrl1-native": ("hpcrl PPO, 1 rank, native env, SB3's value loss", 1,
                      ["vector_env=native", "clip_vloss=false", "vf_coef=1.0"]),
}  # fmt: skip
COLUMNS = {"steps_to_475": "{:,.0f}", "seconds_to_475": "{:.1f}", "final_return_20": "{:.0f}",
           "train_seconds": "{:.1f}", "env_steps_per_s": "{:,.0f}", "process_seconds": "{:.1f}",
           "process_cpu_seconds": "{:.1f}"}  # fmt: skip

SB3_TRAIN = '''
import json, sys, time
seed, budget, threads = (int(a) for a in sys.argv[1:4])
import torch
torch.set_num_threads(threads)
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

class Episodes(BaseCallback):
    """Every finished episode: (return, global env steps, seconds since T0)."""
    rows = []
    def _on_step(self):
        for info in self.locals["infos"]:
            if "episode" in info:
                row = (info["episode"]["r"], self.num_timesteps, time.perf_counter() - T0)
                self.rows.append(row)
        return True

T0 = time.perf_counter()  # like hpcrl's clock: env, model and optimizer setup included
env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, n_epochs=20, gamma=0.98,
            gae_lambda=0.8, ent_coef=0.0, learning_rate=lambda left: 1e-3 * left,
            clip_range=lambda left: 0.2 * left, seed=seed, device="cpu", verbose=0)
setup_s = time.perf_counter() - T0
model.learn(budget, callback=Episodes())
print(json.dumps({"episodes": Episodes.rows, "train_s": time.perf_counter() - T0,
                  "setup_s": setup_s, "env_steps": model.num_timesteps}))
'''


def versions(bin_dir: Path, names=("torch", "gymnasium", "numpy")) -> dict:
    code = "import sys, importlib.metadata as m; print(*(m.version(p) for p in sys.argv[1:]))"
    cmd = [str(bin_dir / "python"), "-c", code, *names]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(names, out, strict=True))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.rstrip()


def ensure_sb3_venv() -> Path:
    """benchmarks/.sb3-venv with SB3, our torch and our gymnasium (made once)."""
    python = SB3_VENV / "bin" / "python"
    check = [str(python), "-c", "import stable_baselines3"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return SB3_VENV / "bin"
    ours = versions(BIN)
    print(f"creating {SB3_VENV} (stable-baselines3, torch {ours['torch']})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(SB3_VENV)], check=True)
    torch_pin = "torch==" + ours["torch"].split("+")[0]  # unpinned torch pulls CUDA wheels
    gym_pin = f"gymnasium=={ours['gymnasium']}"
    pip = [str(SB3_VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, torch_pin, gym_pin, "stable-baselines3"], check=True)
    return SB3_VENV / "bin"


def summarize(returns, env_steps, wall, train_s: float, budget_steps: int) -> dict:
    returns = np.asarray(returns, dtype=np.float64)
    windows = np.convolve(returns, np.ones(WINDOW) / WINDOW, mode="valid")
    hit = np.flatnonzero(windows >= TARGET)
    end = int(hit[0]) + WINDOW - 1 if hit.size else None
    return {
        "steps_to_475": int(env_steps[end]) if end is not None else None,
        "seconds_to_475": round(float(wall[end]), 2) if end is not None else None,
        "final_return_20": round(float(returns[-WINDOW:].mean()), 1),
        "train_seconds": round(train_s, 2),
        "env_steps_per_s": round(budget_steps / train_s),
    }


def run(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cmd`; also its wall seconds and the CPU seconds (user + system) of it and every
    process under it (mpiexec's ranks included): less sensitive to other load than wall."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc, {"process_seconds": round(wall, 1), "process_cpu_seconds": round(cpu, 1)}


def run_sb3(sb3_bin: Path, seed: int, budget: int, threads: int, root: Path) -> dict:
    script = root / "sb3_train.py"
    script.write_text(SB3_TRAIN)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [str(sb3_bin / "python"), str(script), str(seed), str(budget), str(threads)]
    proc, usage = run(cmd, env=env)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    returns, steps, wall = zip(*out["episodes"], strict=True)
    result = {"run": "sb3", "seed": seed}
    result |= summarize(returns, steps, wall, out["train_s"], out["env_steps"])
    return result | usage | {"sb3_setup_seconds": round(out["setup_s"], 2)}


def run_hpcrl(name: str, seed: int, budget: int, root: Path) -> dict:
    _, ranks, extra = RUNS[name]
    run_dir = root / f"{name}-s{seed}"
    cmd = [sys.executable, "-m", "hpcrl", "train", str(REPO / "configs" / "cartpole-ppo.yaml"),
           "--seed", str(seed), "--run-dir", str(run_dir), "--overwrite",
           "--total-env-steps", str(budget), "--set", f"num_envs={8 // ranks}"]  # fmt: skip
    cmd += [a for s in HPCRL_SETS + extra for a in ("--set", s)]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    _, usage = run(cmd)
    with h5py.File(run_dir / "run.h5", "r") as f:
        ep = {k: f[f"episodes/{k}"][()] for k in ("return", "env_steps", "wall_time")}
        train_s = float(f.attrs["wall_time_s"])
    result = {"run": name, "seed": seed}
    result |= summarize(ep["return"], ep["env_steps"], ep["wall_time"], train_s, budget)
    return result | usage


def table(results: list[dict]) -> str:
    lines = [
        "| run | seed | env steps to 475 | s to 475 | final return (20 ep.) | training s "
        "| env steps/s | process s | process CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in groups(results).items():
        for r in [*rows, None]:
            cells = []
            for key, f in COLUMNS.items():
                value = r[key] if r else median_or_none([x[key] for x in rows])
                cells.append(f.format(value) if value is not None else "not reached")
            solved = sum(x["steps_to_475"] is not None for x in rows)
            seed = r["seed"] if r else f"**median** ({solved}/{len(rows)} solved)"
            lines.append(f"| {RUNS[name][0]} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def groups(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["run"], []).append(r)
    return out


def speedups(results: list[dict]) -> dict:
    """SB3 seconds to 475 / each hpcrl run's: of the medians, and per seed."""
    by = groups(results)
    out = {}
    for name, rows in by.items():
        if name == "sb3" or "sb3" not in by:
            continue
        a = median_or_none([r["seconds_to_475"] for r in by["sb3"]])
        b = median_or_none([r["seconds_to_475"] for r in rows])
        out[name] = {
            "median_ratio": round(a / b, 2) if a and b else None,
            "per_seed": {
                x["seed"]: round(x["seconds_to_475"] / y["seconds_to_475"], 2)
                for x, y in zip(by["sb3"], rows, strict=True)
                if x["seconds_to_475"] and y["seconds_to_475"]
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=100_000, help="env steps per run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "sb3_compare.json"))
    parser.add_argument("--sb3-threads", type=int, default=1, help="torch threads for SB3")
    parser.add_argument("--runs", default="sb3,hpcrl1-native,hpcrl1", help=",".join(RUNS))
    opts = parser.parse_args()
    if set(opts.runs.split(",")) - RUNS.keys():
        parser.error(f"--runs: names from {', '.join(RUNS)}")
    sb3_bin = ensure_sb3_venv()
    sb3_versions = versions(sb3_bin, ("stable-baselines3", "torch", "gymnasium", "numpy"))
    meta = {
        "versions": {"hpcrl venv": versions(BIN), "sb3 venv": sb3_versions},
        "budget": opts.budget,
        "sb3_threads": opts.sb3_threads,
        "load_average_before": os.getloadavg(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_src": git("status", "--porcelain", "src").splitlines(),
    }
    print(json.dumps(meta), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="hpcrl-sb3-") as tmp:
        for seed in range(1, opts.seeds + 1):
            for name in opts.runs.split(","):
                if name == "sb3":
                    result = run_sb3(sb3_bin, seed, opts.budget, opts.sb3_threads, Path(tmp))
                else:
                    result = run_hpcrl(name, seed, opts.budget, Path(tmp))
                results.append(result | {"load_average_1m": round(os.getloadavg()[0], 2)})
                print(json.dumps(results[-1]), flush=True)
    ratios = speedups(results)
    meta["load_average_after"] = os.getloadavg()
    out = {"meta": meta, "sb3_s_to_475_over_hpcrl": ratios, "runs": results}
    Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(results) + "\n")
    for name, ratio in ratios.items():
        print(f"SB3 s to 475 / {RUNS[name][0]} s to 475: median {ratio['median_ratio']}, "
              f"per seed {ratio['per_seed']}")  # fmt: skip


if __name__ == "__main__":
    main()
