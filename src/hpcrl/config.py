"""Run configuration: dataclasses, YAML files, dotted overrides and validation with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpcrl.algos import ALGOS, algorithm
from hpcrl.errors import ConfigError, first_line

# `RunConfig.vector_env`; hpcrl.envs.make_vector_env
VECTOR_ENVS = ("auto", "sync", "async", "native", "table")

_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")

MAX_ENV_STEPS = 10**15  # far beyond any run; keeps every counter exact in int64 and float64

# `python -m hpcrl` with no arguments: IMPALA on CartPole-v1 (rank 0 learner, the other
# ranks actors). The same values as configs/cartpole-impala.yaml, which explains them
# (a test keeps the two equal).
DEFAULT_JOB: dict = {
    "algo": "impala",
    "env_id": "CartPole-v1",
    "total_env_steps": 1_000_000,
    "num_envs": 4,
    "unroll_length": 32,
    "unrolls_per_update": 2,
    "max_unrolls_per_update": 8,
    "max_unrolls_in_flight": 1,
    "learner_ranks": 1,
    "learning_rate": 0.002,
    "anneal_lr": True,
    "max_grad_norm": 0.5,
    "gamma": 0.99,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_policy_lag": 20,
    "eval_interval": 50_000,
    "solved_lr_decay": 0.5,
    "eval_episodes": 100,
    "record_trajectories": True,
}


@dataclass
class DebugConfig:
    """Test-only fault injection."""

    fail_rank: int = -1  # raise an exception on this rank (-1: never)
    fail_after_env_steps: int = 0  # ... once that rank has taken this many env steps
    slow_rank: int = -1  # make this rank a straggler (-1: none; data-parallel layout)
    slow_step_s: float = 0.0  # ... by sleeping this long before each of its vector steps
    # a fresh run's acting ranks each request preemption, as SIGUSR1 would, once they have
    # taken this many env steps (0: never; a resumed run never does)
    preempt_after_env_steps: int = 0

    def validate(self) -> None:
        _check(
            self.fail_after_env_steps >= 0,
            "debug.fail_after_env_steps",
            self.fail_after_env_steps,
            "an integer >= 0",
        )
        _check(self.slow_step_s >= 0, "debug.slow_step_s", self.slow_step_s, "seconds >= 0")
        _check(
            self.preempt_after_env_steps >= 0,
            "debug.preempt_after_env_steps",
            self.preempt_after_env_steps,
            "an integer >= 0",
        )


@dataclass
class RunConfig:
    """Keys every algorithm shares. Per-rank quantities say so."""

    algo: str = "qlearning"
    env_id: str = "FrozenLake8x8-v1"
    # A module imported on every rank before the env is made, for a package that registers
    # its envs on import; gymnasium's "pkg.mod:Env-v0" form of env_id sets it.
    env_module: str = ""
    env_kwargs: dict = field(default_factory=dict)
    total_env_steps: int = 3_000_000  # summed over every acting rank
    seed: int = 0
    num_envs: int = 32  # gymnasium vector env copies per acting rank
    # sync: copies stepped in turn; async: a subprocess per copy; native: gymnasium's numpy
    # implementation of all copies at once (CartPole), hpcrl.native_vector; table: toy-text
    # MDPs sampled from their transition table P, bit-identical to sync (hpcrl.table_vector);
    # auto: table where it is exact (FrozenLake, CliffWalking, Taxi), sync elsewhere
    vector_env: str = "auto"
    atari_preprocessing: bool = True  # ALE ids: AtariPreprocessing (84x84 gray, skip 4)
    frame_stack: int = 4  # ALE ids with atari_preprocessing: frames stacked (1: none)
    run_dir: str = ""  # "" -> runs/<algo>-<env_id>-<UTC time>
    log_interval_s: float = 5.0
    checkpoint_interval_env_steps: int = 0  # 0: none by env steps (one at the end)
    # also one every this many seconds (0: none): a hard kill (no signal) loses at most this
    checkpoint_interval_s: float = 120.0
    keep_checkpoints: int = 3
    record_trajectories: bool = True
    tensorboard: bool = False  # rank 0 also writes /metrics and returns to RUN_DIR/tb/
    eval_episodes: int = 1000  # greedy evaluation printed at the end of `train` (0: none)
    # Stop training early, as completed, once the mean return of the last 20 training
    # episodes reaches this (e.g. 475 for CartPole-v1); null: train the whole budget
    stop_at_return: float | None = None
    # Deep layouts: a greedy evaluation on rank 0 every this many env steps, the best kept
    # as checkpoints/best.h5 (0: none), of this many episodes.
    eval_interval: int = 0
    periodic_eval_episodes: int = 10
    watchdog_s: float = 300.0  # a blocking wait longer than this aborts the job
    torch_threads: int = 1
    # "cuda": each rank's model (deep learners), or its envs and Q-table (qlearning with
    # layout allreduce, hpcrl.table_torch), on a GPU of its node
    device: str = "cpu"
    debug: DebugConfig = field(default_factory=DebugConfig)

    def env_options(self) -> dict:
        """The keyword options of `hpcrl.envs.make_env` this config sets."""
        return {"atari_preprocessing": self.atari_preprocessing, "frame_stack": self.frame_stack}

    def validate(self) -> None:
        _check(self.algo in ALGOS, "algo", self.algo, f"one of {sorted(ALGOS)}")
        _check(
            isinstance(self.env_id, str) and self.env_id != "",
            "env_id",
            self.env_id,
            "a gymnasium id",
        )
        _check(
            0 < self.total_env_steps <= MAX_ENV_STEPS,
            "total_env_steps",
            self.total_env_steps,
            f"an integer in [1, {MAX_ENV_STEPS:.0e}]",
        )
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(self.num_envs >= 1, "num_envs", self.num_envs, "an integer >= 1")
        _check(
            self.vector_env in VECTOR_ENVS, "vector_env", self.vector_env, " or ".join(VECTOR_ENVS)
        )
        _check(self.frame_stack >= 1, "frame_stack", self.frame_stack, "an integer >= 1")
        _check(self.log_interval_s > 0, "log_interval_s", self.log_interval_s, "a number > 0")
        _check(
            self.checkpoint_interval_env_steps >= 0,
            "checkpoint_interval_env_steps",
            self.checkpoint_interval_env_steps,
            "an integer >= 0",
        )
        _check(
            self.checkpoint_interval_s >= 0,
            "checkpoint_interval_s",
            self.checkpoint_interval_s,
            "a number of seconds >= 0",
        )
        _check(
            self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1"
        )
        _check(self.eval_episodes >= 0, "eval_episodes", self.eval_episodes, "an integer >= 0")
        _check(self.eval_interval >= 0, "eval_interval", self.eval_interval, "env steps >= 0")
        _check(
            self.periodic_eval_episodes >= 1,
            "periodic_eval_episodes",
            self.periodic_eval_episodes,
            "an integer >= 1",
        )
        _check(self.watchdog_s > 0, "watchdog_s", self.watchdog_s, "a number > 0")
        _check(self.torch_threads >= 1, "torch_threads", self.torch_threads, "an integer >= 1")
        _check(self.device in ("cpu", "cuda"), "device", self.device, "'cpu' or 'cuda'")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "config key 'tensorboard': true needs the tensorboard package, which is not "
                "installed: pip install 'hpcrl[analysis]'"
            )
        self.debug.validate()


# Keys a resumed run may change: how it is logged, checkpointed, evaluated and watched,
# never what it computes. Any other key that differs from the checkpoint's is refused.
RESUMABLE_KEYS = frozenset(
    {
        "run_dir",
        "log_interval_s",
        "checkpoint_interval_env_steps",
        "checkpoint_interval_s",
        "keep_checkpoints",
        "eval_episodes",
        "stop_at_return",
        "eval_interval",
        "periodic_eval_episodes",
        "actor_nice",
        "watchdog_s",
        "torch_threads",
        "tensorboard",
        "debug.fail_rank",
        "debug.fail_after_env_steps",
        "debug.slow_rank",
        "debug.slow_step_s",
    }
)


@dataclass
class Config:
    """A whole run's configuration: the shared keys, the layout and its settings (its
    topology's `Config`, e.g. `PSConfig`), and the algorithm's hyperparameters (its own
    dataclass, e.g. `PPOConfig`).

    The file and `--set` forms are flat (`alpha: 0.1`, `layout: ps`, `debug.fail_rank: 2`);
    a key is looked up among the shared keys, then the layout's, then the algorithm's (no
    key is in two of them).
    """

    run: RunConfig
    layout: str
    topology: Any
    algo: Any

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self.run)
        out["layout"] = self.layout
        out.update(dataclasses.asdict(self.topology))
        out.update(dataclasses.asdict(self.algo))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def flat(self) -> dict:
        """`to_dict()` with nested mappings as dotted keys (`debug.fail_rank`), the form of
        config files and `--set`."""
        return flatten(self.to_dict())


def resume_conflicts(checkpoint: dict, requested: Config) -> list[str]:
    """The keys whose requested value differs from the checkpoint's config and that a
    resume may not change (not in `RESUMABLE_KEYS`), as `key 'new' (checkpoint: 'old')`.

    Args:
        checkpoint: the checkpoint's config (`Config.to_dict()` output).
        requested: the config built from the checkpoint's values overlaid with the user's.
    """
    old = upgrade_keys(flatten(checkpoint))
    out = []
    for key, value in requested.flat().items():
        if key in RESUMABLE_KEYS or key not in old or old[key] == value:
            continue
        out.append(f"{key} {value!r} (checkpoint: {old[key]!r})")
    return out


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}, expected {expected}")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a flat dict (nested mappings become dotted keys).

    Raises:
        ConfigError: the file is missing, unreadable, or not a mapping.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = f"config file {str(path)!r}"
        raise ConfigError(f"{where} is not valid YAML: {_yaml_error(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys to values")
    return flatten(data)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line, with the line and column (1-based) it points at."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{what}" + (f" ({context})" if context else "")


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested mappings as dotted keys (`{"debug": {"fail_rank": 2}}` -> `debug.fail_rank`),
    the form of config files and `--set`; `env_kwargs` stays one dict value."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "env_kwargs":
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set dotted.key=value`; the value is read as YAML (`0.1`, `true`, `[1, 2]`).

    Raises:
        ConfigError: no `=` in `text`.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set alpha=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected true or false")
    if typ in (int, float) and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        # PyYAML (YAML 1.1) reads `1e6` and `1e-3` as strings; accept them as numbers.
        value = float(value)
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 and 1.0e+6
        raise ConfigError(f"config key '{key}': got {value!r}, expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': got {value!r}, expected a finite number")
            return float(value)
        raise ConfigError(f"config key '{key}': got {value!r}, expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected a string")
    if typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(typ) or (Any,)
            return [_coerce(key, v, item) if item is not Any else v for v in value]
        raise ConfigError(f"config key '{key}': got {value!r}, expected a list, e.g. [64, 64]")
    if typ is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected a mapping")
    return value


def build_config(values: dict[str, Any], import_env: bool = True) -> Config:
    """Build and validate a `Config` from flat `{dotted_key: value}` pairs, and import its
    `env_module` (unless `import_env` is False: a policy loaded without its simulator).

    Later sources should already have been merged over earlier ones by the caller
    (defaults < YAML file < CLI options < `--set`). Defaults: the dataclasses', then the
    algorithm's `run_defaults` and `topology_defaults` over them.

    Raises:
        ConfigError: unknown algo, layout or key (the closest valid key is suggested; a
            renamed key names its new name), a value of the wrong type, or a value out of
            range.
    """
    from hpcrl.topologies import topology_class

    algo_name = _coerce("algo", values.get("algo", RunConfig.algo), str)
    spec = algorithm(algo_name)
    layout = _coerce("layout", values.get("layout", spec.layouts[0]), str)
    if layout not in spec.layouts:
        expected = (
            f"'{spec.layouts[0]}'" if len(spec.layouts) == 1 else f"one of {list(spec.layouts)}"
        )
        raise ConfigError(f"config key 'layout': got {layout!r}, expected {expected}")
    topology_cls = topology_class(layout).Config
    parts = {
        "run": _field_types(RunConfig),
        "topology": _field_types(topology_cls),
        "algo": _field_types(spec.config),
    }
    del parts["run"]["debug"]
    debug_types = _field_types(DebugConfig)
    valid = [k for types_ in parts.values() for k in types_] + ["layout"]
    valid += [f"debug.{k}" for k in debug_types]

    kw: dict[str, dict[str, Any]] = {
        "run": dict(spec.run_defaults),
        "topology": {k: v for k, v in spec.topology_defaults.items() if k in parts["topology"]},
        "algo": {},
    }
    debug_kw: dict[str, Any] = {}
    for key, value in values.items():
        part = next((name for name, types_ in parts.items() if key in types_), None)
        if part is not None:
            kw[part][key] = _coerce(key, value, parts[part][key])
        elif key == "layout":
            continue
        elif key.startswith("debug.") and key[6:] in debug_types:
            debug_kw[key[6:]] = _coerce(key, value, debug_types[key[6:]])
        elif key in spec.renamed_keys:
            raise ConfigError(
                f"config key '{key}' is now '{spec.renamed_keys[key]}' for algo "
                f"'{algo_name}' (names carry their unit)"
            )
        else:
            hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            near = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown config key '{key}' for algo '{algo_name}'{near}")
    _split_env_module(kw["run"])
    run = RunConfig(**kw["run"], debug=DebugConfig(**debug_kw))
    topology = topology_cls(**kw["topology"])
    algo = spec.config(**kw["algo"])
    run.validate()
    topology.validate()
    algo.validate()
    if import_env:
        import_env_module(run.env_module)
    return Config(run=run, layout=layout, topology=topology, algo=algo)


def _split_env_module(run: dict[str, Any]) -> None:
    """gymnasium's `"pkg.mod:Env-v0"` env id: `env_id` "Env-v0", `env_module` "pkg.mod"."""
    env_id = run.get("env_id")
    if not isinstance(env_id, str) or ":" not in env_id:
        return
    module, _, name = env_id.partition(":")
    given = run.get("env_module") or ""
    if not module or not name or (given and given != module):
        expected = "'package.module:EnvId'"
        if given and given != module:
            expected += f" whose module is env_module {given!r}, or env_module alone"
        raise ConfigError(f"config key 'env_id': got {env_id!r}, expected {expected}")
    run["env_id"], run["env_module"] = name, module


def import_env_module(name: str) -> None:
    """Import `name` (a module that registers gymnasium envs on import); "" does nothing.

    Raises:
        ConfigError: the module, or something it imports, fails to import; one line naming
            it and the first line of the error.
    """
    if not name:
        return
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure inside the user's module
        raise ConfigError(
            f"config key 'env_module': {name!r} could not be imported "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from None


def upgrade_keys(flat: dict) -> dict:
    """Flat config values of an older hpcrl (a run directory's stored config) with their
    renamed keys under the new names (`Algorithm.renamed_keys`, e.g. PPO's `batch_size`
    is now `env_steps_per_update`)."""
    name = flat.get("algo", RunConfig.algo)
    if name not in ALGOS:
        return flat
    out = dict(flat)
    for old, new in algorithm(name).renamed_keys.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def config_from_json(text: str, import_env: bool = True) -> Config:
    """Rebuild a `Config` from the JSON stored in `run.h5` (`to_json` output); `import_env`
    as for `build_config`."""
    data = json.loads(text)
    return build_config(upgrade_keys(flatten(data)), import_env)
