"""Unit tests of A3C and asynchronous (one-step and n-step) Q-learning on one process,
without an MPI launcher: the A3C loss against n-step returns written out from their
definition, its gradient against autograd, the Q-learning targets (one-step and n-step,
on the target network), the target-network copies and parameter exchange, the per-actor
ε schedule (Mnih et al. 2016, §5.1), the config checks and `unroll_targets`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import env_spaces
from hpcrl.algos import a3c, async_nstep_q, async_q
from hpcrl.algos.async_learner import unroll_targets
from hpcrl.errors import ConfigError, UserError

T, B, GAMMA = 5, 3, 0.9


class NoGroup:
    """A learner group of one: nothing to average."""

    def average_gradients(self) -> None:
        pass

    def clip_gradients(self, max_norm: float) -> None:
        pass  # FlatGradients.clip is tested in test_deep_units


def _unroll(seed: int = 0) -> dict[str, np.ndarray]:
    """A CartPole unroll with a terminal step (t=1, copy 0) and a time-limit cut (t=3,
    copy 1); truncation values are nonzero everywhere, so only the cut may use them."""
    rng = np.random.default_rng(seed)
    terminated = np.zeros((T, B), np.float32)
    truncated = np.zeros((T, B), np.float32)
    terminated[1, 0] = 1.0
    truncated[3, 1] = 1.0
    return {
        "obs": rng.normal(size=(T + 1, B, 4)).astype(np.float32),
        "actions": rng.integers(0, 2, size=(T, B)).astype(np.int64),
        "rewards": rng.uniform(0.0, 2.0, size=(T, B)).astype(np.float32),
        "terminated": terminated,
        "truncated": truncated,
        "truncation_values": rng.normal(3.0, 2.0, size=(T, B)).astype(np.float32),
    }


def _returns(u, bootstrap: np.ndarray) -> np.ndarray:
    """R_t = r_t + γ R_{t+1} in an episode; 0 after a terminal step, the truncation
    value after a cut, `bootstrap` (B,) after the unroll's last step."""
    R = np.zeros((T, B))
    for b in range(B):
        future = float(bootstrap[b])
        for t in reversed(range(T)):
            if u["terminated"][t, b]:
                future = 0.0
            elif u["truncated"][t, b]:
                future = float(u["truncation_values"][t, b])
            R[t, b] = u["rewards"][t, b] + GAMMA * future
            future = R[t, b]
    return R


def _a3c(seed: int = 0) -> a3c.A3C:
    torch.manual_seed(seed)
    return a3c.A3C(a3c.A3CConfig(gamma=GAMMA, hidden_size=16), *env_spaces())


def test_a3c_loss_is_the_n_step_actor_critic_loss():
    learner, u = _a3c(), _unroll()
    loss, metrics = learner.loss(u)
    with torch.no_grad():
        obs = torch.as_tensor(u["obs"].reshape(-1, 4))
        V = learner.model.value(obs).reshape(T + 1, B).double().numpy()
        log_pi, entropy, _ = learner.model.evaluate_actions(
            obs[: T * B], torch.as_tensor(u["actions"].reshape(-1))
        )
    log_pi = log_pi.reshape(T, B).double().numpy()
    R = _returns(u, V[T])
    value_loss = np.mean((R - V[:T]) ** 2)
    policy_loss = -np.mean((R - V[:T]) * log_pi)
    assert metrics["losses/value"] == pytest.approx(value_loss, rel=1e-5)
    assert metrics["losses/policy"] == pytest.approx(policy_loss, rel=1e-5, abs=1e-6)
    cfg = learner.cfg
    expected = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * float(entropy.mean())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_a3c_gradient_is_the_autograd_gradient_and_backward_takes_the_mean():
    learner, u = _a3c(), _unroll()
    reference = copy.deepcopy(learner.model)
    learner.gradient(u)
    grad = learner.gradient(u)  # the second call must not accumulate onto the first
    n = sum(p.numel() for p in learner.model.parameters())
    assert grad.dtype == np.float32 and grad.shape == (n,)
    learner.model, original = reference, learner.model
    loss, _ = learner.loss(u)
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).numpy()
    learner.model = original
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert np.abs(grad).max() > 0

    G = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    learner._backward({"gradient": G})
    np.testing.assert_allclose(learner.flat_gradient(), G.mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("double_q,scale", [(False, 1.0), (True, 1.0), (True, 0.1)])
@pytest.mark.parametrize("n_step", [False, True])
def test_async_q_loss_is_huber_on_target_network_targets(n_step, double_q, scale):
    """Bootstraps max_a Q(x, a; θ⁻), or with `double_q` Q(x, argmax_a Q(x, a; θ'); θ⁻);
    `reward_scale` scales r_t and not the truncation values (already Q estimates)."""
    torch.manual_seed(0)
    kw = {"gamma": GAMMA, "hidden_size": 16, "double_q": double_q, "reward_scale": scale}
    cfg = (
        async_nstep_q.AsyncNStepQConfig(**kw)
        if n_step
        else async_q.AsyncQConfig(n_step=False, **kw)
    )
    learner, u = async_q.AsyncQ(cfg, *env_spaces()), _unroll()
    with torch.no_grad():
        # θ⁻: θ with the output layer negated, so Q(·; θ⁻) = −Q(·; θ): the two networks'
        # greedy actions differ everywhere, and so do double and plain targets.
        target, online = list(learner.target.parameters()), list(learner.model.parameters())
        for p, q in zip(target[-2:], online[-2:], strict=True):
            p.copy_(-q)
    obs = torch.as_tensor(u["obs"].reshape(-1, 4))
    with torch.no_grad():
        q_all = learner.model(obs).reshape(T + 1, B, 2).double().numpy()
        q_target = learner.target(obs).reshape(T + 1, B, 2).double().numpy()

    def expected_loss(q_next: np.ndarray, q_select: np.ndarray | None = None) -> float:
        best = (q_next if q_select is None else q_select).argmax(-1)
        max_next = np.take_along_axis(q_next, best[..., None], -1)[..., 0]
        y = np.zeros((T, B))
        for b in range(B):
            for t in reversed(range(T)):
                cut = u["terminated"][t, b] or u["truncated"][t, b]
                g = 0.0 if cut else GAMMA
                r = u["rewards"][t, b] * scale
                if u["truncated"][t, b]:
                    r += GAMMA * u["truncation_values"][t, b]
                future = max_next[t + 1, b] if not n_step or t == T - 1 else y[t + 1, b]
                y[t, b] = r + g * future
        q = np.take_along_axis(q_all[:T], u["actions"][..., None], -1)[..., 0]
        d = np.abs(y - q)
        return float(np.mean(np.where(d < 1.0, 0.5 * d**2, d - 0.5)))

    loss, metrics = learner.loss(u)
    expected = expected_loss(q_target, q_all if double_q else None)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["losses/td"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected_loss(q_all) - expected) > 1e-2  # the online network would not do
    other = expected_loss(q_target, None if double_q else q_all)
    assert abs(other - expected) > 1e-3  # double and plain targets differ here
    best = (q_all if double_q else q_target)[T].argmax(-1)  # time-limit bootstraps too
    bootstrap = np.take_along_axis(q_target[T], best[:, None], -1)[:, 0]
    np.testing.assert_allclose(learner.values(u["obs"][T]), bootstrap, rtol=1e-5)


def _q(seed: int = 0, **kw) -> async_q.AsyncQ:
    torch.manual_seed(seed)
    return async_q.AsyncQ(async_q.AsyncQConfig(hidden_size=8, **kw), *env_spaces(), seed=seed)


def _flat(module: torch.nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach().numpy().copy()


def test_async_q_publishes_both_networks_and_round_trips():
    a, b = _q(0), _q(1)
    with torch.no_grad():
        for p in a.target.parameters():
            p.mul_(2.0)
    flat = a.published()
    n = _flat(a.model).size
    assert flat.dtype == np.float32 and flat.shape == (2 * n,)
    np.testing.assert_array_equal(flat[:n], _flat(a.model))
    np.testing.assert_array_equal(flat[n:], _flat(a.target))
    assert not np.array_equal(_flat(b.model), _flat(a.model))
    b.load_published(flat.copy())
    np.testing.assert_array_equal(_flat(b.model), _flat(a.model))
    np.testing.assert_array_equal(_flat(b.target), _flat(a.target))


def test_target_network_is_copied_every_interval_updates():
    learner = _q(0, target_update_interval=3)
    n = _flat(learner.model).size
    rng = np.random.default_rng(0)
    initial = _flat(learner.target)
    for update in range(1, 8):
        gradient = rng.normal(size=(n, 1)).astype(np.float32)
        learner.update({"gradient": gradient}, NoGroup(), 0.0)
        model, target = _flat(learner.model), _flat(learner.target)
        if update % 3 == 0:
            np.testing.assert_array_equal(target, model, err_msg=f"update {update}")
            initial = model
        else:
            assert not np.array_equal(target, model), update
            np.testing.assert_array_equal(target, initial, err_msg=f"update {update}")


def test_shared_arrays_round_trip_includes_the_target():
    a = _q(0, target_update_interval=100)
    n = _flat(a.model).size
    a.update({"gradient": np.ones((n, 1), np.float32)}, NoGroup(), 0.0)
    arrays = a.shared_arrays()
    assert any(k.startswith("target/") for k in arrays)
    assert any(k.startswith("optimizer/") for k in arrays)
    b = _q(1, target_update_interval=100)
    b.load_shared(arrays)
    assert not np.array_equal(_flat(a.model), _flat(a.target))  # one update, no copy
    np.testing.assert_array_equal(_flat(b.model), _flat(a.model))
    np.testing.assert_array_equal(_flat(b.target), _flat(a.target))
    again = b.shared_arrays()
    assert again.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_final_epsilons_are_drawn_with_the_papers_frequencies(monkeypatch):
    # a one-weight network: building 2000 real ones takes a minute and draws no ε
    monkeypatch.setattr(async_q, "q_network", lambda *args, **kw: torch.nn.Linear(1, 1))
    space = env_spaces()
    cfg = async_q.AsyncQConfig(hidden_size=2)
    finals = np.array([async_q.AsyncQ(cfg, *space, seed=s).epsilon(1.0) for s in range(2000)])
    assert set(np.unique(finals)) == {0.1, 0.01, 0.5}
    for value, prob in zip((0.1, 0.01, 0.5), (0.4, 0.3, 0.3), strict=True):
        assert np.mean(finals == value) == pytest.approx(prob, abs=0.05), value
    fixed = async_q.AsyncQConfig(hidden_size=2, epsilon_end=0.2)
    assert {async_q.AsyncQ(fixed, *space, seed=s).epsilon(1.0) for s in range(50)} == {0.2}


def test_epsilon_schedule_and_acting():
    learner = _q(0, epsilon_end=0.0, exploration_fraction=0.3)
    assert learner.epsilon(0.0) == 1.0
    assert learner.epsilon(0.15) == pytest.approx(0.5)
    assert learner.epsilon(0.3) == 0.0 and learner.epsilon(0.9) == 0.0
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    for progress in (0.0, 0.5):
        actions, log_probs = learner.act(obs, progress)
        assert actions.dtype == np.int64 and actions.shape == (64,)
        assert set(np.unique(actions)) <= {0, 1}
        assert log_probs.dtype == np.float32 and not log_probs.any()
    with torch.no_grad():
        greedy = learner.model(torch.as_tensor(obs)).argmax(-1).numpy()
    np.testing.assert_array_equal(learner.act(obs, 0.5)[0], greedy)
    random = np.stack([learner.act(obs, 0.0)[0] for _ in range(5)])
    assert (random != greedy).any()  # ε = 1 at the start: not the greedy actions


@pytest.mark.parametrize(
    "key,value",
    [
        ("target_update_interval", 0),
        ("exploration_fraction", 1.5),
        ("epsilon_end", 2),
        ("reward_scale", 0.0),
    ],
)
def test_async_q_config_validation_names_the_key(key, value):
    async_q.AsyncQConfig().validate()
    with pytest.raises(ConfigError, match=f"'{key}': got {value!r}"):
        async_q.AsyncQConfig(**{key: value}).validate()


def test_async_q_needs_discrete_actions_and_a3c_defaults_are_the_papers():
    with pytest.raises(UserError, match="Discrete"):
        async_q.AsyncQConfig().check_spaces(*env_spaces("Pendulum-v1"))
    async_q.AsyncQConfig().check_spaces(*env_spaces())
    cfg = a3c.A3CConfig()
    assert cfg.unroll_length == 5 and cfg.optimizer == "rmsprop"
    assert isinstance(_a3c().optimizer, torch.optim.RMSprop)
    assert async_nstep_q.AsyncNStepQConfig().n_step and not async_q.AsyncQConfig().n_step


def test_unroll_targets_cut_at_episode_ends_and_fold_truncation_values():
    u = _unroll()
    discounts, rewards = unroll_targets(u, GAMMA)
    assert discounts.dtype == np.float32 and rewards.dtype == np.float32
    expected_d = np.full((T, B), GAMMA, np.float32)
    expected_d[1, 0] = expected_d[3, 1] = 0.0
    np.testing.assert_allclose(discounts, expected_d)
    expected_r = u["rewards"].copy()
    expected_r[3, 1] += GAMMA * u["truncation_values"][3, 1]
    assert u["truncation_values"][1, 0] != 0  # ignored at the terminal step
    np.testing.assert_allclose(rewards, expected_r, rtol=1e-6)


@pytest.mark.parametrize("algo", ["a3c", "async_q"])
def test_load_published_copies_out_of_the_buffer(algo):
    """Actors load parameters from a receive buffer and post the next receive into it at
    once: the model must own its values, not view the buffer."""
    obs_space, act_space = env_spaces()
    module = {"a3c": a3c, "async_q": async_q}[algo]
    spec = module.ALGORITHM
    source, actor = (
        spec.make_learner(spec.config(hidden_size=8), obs_space, act_space) for _ in "ab"
    )
    buffer = source.published().copy()
    actor.load_published(buffer)
    before = actor.published().copy()
    np.testing.assert_array_equal(before, buffer)
    buffer[:] = 0.0  # the next message lands in the same buffer
    np.testing.assert_array_equal(actor.published(), before)
