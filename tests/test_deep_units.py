"""Unit tests of the data-parallel learners' pieces, on one process without MPI: the rollout
storage, the global-batch split errors, DQN's target update and its checkpoint round trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hpcrl.algos import a2c, dqn, ppo
from hpcrl.algos.rollout import Rollout
from hpcrl.envs import EnvStepper, make_vector_env
from hpcrl.errors import ConfigError


class OneRank:
    """`DataParallel` for a world of one: nothing to average."""

    def average_gradients(self) -> None:
        pass

    def clip_gradients(self, max_norm: float) -> None:
        pass  # FlatGradients.clip is tested in test_deep_units

    def mean_std(self, values):
        return float(np.mean(values)), float(np.std(values))


def test_rollout_stacks_time_major_and_empties():
    rollout = Rollout()
    for t in range(3):
        rollout.add_action(
            np.full((2, 4), t, np.float32), torch.tensor([0, 1]), torch.zeros(2), torch.ones(2)
        )
        rollout.add_outcome(
            np.array([1.0, 2.0]), np.array([False, t == 2]), np.zeros(2, bool), np.zeros((2, 4))
        )
    assert len(rollout) == 3
    steps = rollout.take()
    assert steps["obs"].shape == (3, 2, 4) and steps["rewards"].shape == (3, 2)
    assert steps["terminated"].dtype == torch.float32
    assert steps["terminated"][2, 1] == 1.0 and steps["terminated"][:2].sum() == 0
    assert torch.equal(steps["obs"][1], torch.ones(2, 4))
    assert len(rollout) == 0


@pytest.mark.parametrize(
    "config,world,num_envs,match",
    [
        (
            ppo.PPOConfig(env_steps_per_update=512, minibatch_size=256),
            3,
            2,
            r"env_steps_per_update 512.*3 ranks",
        ),
        (ppo.PPOConfig(env_steps_per_update=512, minibatch_size=2), 4, 1, r"minibatch_size 2"),
        (a2c.A2CConfig(env_steps_per_update=40), 3, 1, r"env_steps_per_update 40.*3 ranks"),
        (
            dqn.DQNConfig(train_frequency=16, minibatch_size=64),
            3,
            1,
            r"train_frequency 16.*3 ranks",
        ),
        (dqn.DQNConfig(train_frequency=16, minibatch_size=63), 2, 1, r"minibatch_size 63"),
    ],
)
def test_a_global_batch_that_does_not_split_is_refused(config, world, num_envs, match):
    with pytest.raises(ConfigError, match=match):
        config.rollout_steps(world, num_envs)


@pytest.mark.parametrize(
    "config,global_steps",
    [(ppo.PPOConfig(), 2048), (a2c.A2CConfig(), 40), (dqn.DQNConfig(train_frequency=16), 16)],
)
def test_global_batch_splits_into_per_rank_rollouts(config, global_steps):
    """2 ranks x 2 env copies: each rank's rollout is a quarter of the global batch."""
    assert config.rollout_steps(2, 2) * 2 * 2 == global_steps
    assert config.rollout_steps(1, 1) == global_steps


def _dqn(cfg: dqn.DQNConfig, seed: int):
    torch.manual_seed(seed)
    envs = make_vector_env("CartPole-v1", None, 1)
    learner = dqn.DQN(cfg, envs.single_observation_space, envs.single_action_space, 1, 1, seed)
    return learner, EnvStepper(envs, 0)


def _run(learner, stepper, steps: int, start: int, budget: int = 100_000) -> None:
    for t in range(start, start + steps):
        actions = learner.act(stepper.obs, t / budget)
        batch = stepper.step(actions)
        learner.observe(batch.rewards, batch.terminated, batch.truncated, batch.next_obs)
        if (t + 1) % learner.rollout_steps == 0:
            learner.update(OneRank(), (t + 1) / budget)


def test_dqn_polyak_target_update():
    learner, _ = _dqn(dqn.DQNConfig(tau=0.25), 0)
    online = [p.detach().clone() for p in learner.model.parameters()]
    with torch.no_grad():
        for p in learner.target.parameters():
            p.fill_(1.0)
    learner._update_target()
    for p, target in zip(online, learner.target.parameters(), strict=True):
        assert torch.allclose(target, 0.25 * p + 0.75)


def test_dqn_target_starts_as_the_online_network_at_the_first_gradient_step():
    """Made at the first gradient step (after the topology's broadcast), so it is the same
    on every rank, whatever each rank's random init was."""
    cfg = dqn.DQNConfig(learning_starts=8, train_frequency=8, tau=0.01, target_update_interval=1)
    learner, stepper = _dqn(cfg, 0)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1.0)  # as if rank 0's parameters had been broadcast over these
    before = [p.detach().clone() for p in learner.model.parameters()]
    _run(learner, stepper, 8, 0)
    assert learner.gradient_steps == 1
    for p0, p1, target in zip(
        before, learner.model.parameters(), learner.target.parameters(), strict=True
    ):
        assert torch.allclose(target, 0.99 * p0 + 0.01 * p1.detach())


@pytest.mark.parametrize("double_dqn", [False, True])
def test_dqn_checkpoint_round_trip_continues_identically(double_dqn):
    cfg = dqn.DQNConfig(
        learning_starts=64,
        train_frequency=8,
        gradient_steps=2,
        minibatch_size=16,
        buffer_size=300,  # wraps around within the run
        tau=0.1,
        target_update_interval=1,
        anneal_lr=True,
        double_dqn=double_dqn,
        exploration_fraction=0.5,
    )
    a, stepper_a = _dqn(cfg, 1)
    _run(a, stepper_a, 400, 0, budget=1000)
    shared = copy.deepcopy(a.shared_arrays())
    rank = copy.deepcopy(a.rank_arrays())
    env_state = copy.deepcopy(stepper_a.state_dict())
    b, stepper_b = _dqn(cfg, 2)  # different init and generators, all overwritten
    b.load_shared(shared)
    b.load_rank(rank)
    b.learner_updates = a.learner_updates
    stepper_b.load_state_dict(env_state, 5)
    _run(a, stepper_a, 200, 400, budget=1000)
    _run(b, stepper_b, 200, 400, budget=1000)
    for name, value in (a.shared_arrays() | a.rank_arrays()).items():
        assert np.array_equal(value, (b.shared_arrays() | b.rank_arrays())[name]), name


def test_observation_normalizer_pools_the_ranks_sums_like_one_process():
    """Two ranks' rollouts merged through one summed buffer give the statistics of all the
    observations (up to the 1e-4 prior count), and both ranks normalize alike."""
    from hpcrl.normalization import CLIP, ObservationNormalizer

    rng = np.random.default_rng(0)
    data = [rng.normal([5.0, -3.0], [2.0, 0.1], size=(n, 2)) for n in (300, 500)]
    ranks = [ObservationNormalizer((2,)) for _ in data]
    for norm, obs in zip(ranks, data, strict=True):
        norm.accumulate(obs)
    pooled = sum(norm._sums for norm in ranks)  # what the Allreduce computes

    def fake_allreduce(buffer):
        buffer[:] = pooled

    for norm in ranks:
        norm.merge(fake_allreduce)
    everything = np.concatenate(data)
    for norm in ranks:
        np.testing.assert_allclose(norm.mean, everything.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(norm.var, everything.var(axis=0), rtol=1e-5, atol=1e-5)
        assert norm.count == pytest.approx(800, abs=1e-3)
        assert not norm._sums.any()
    z = ranks[0](everything)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-4)
    assert ranks[0](np.array([[1e9, 0.0]]))[0, 0] == CLIP
    restored = ObservationNormalizer((2,))
    restored.load(ranks[1].arrays())
    np.testing.assert_array_equal(restored(everything), ranks[1](everything))


def test_normalize_obs_refuses_image_observations():
    import gymnasium as gym

    from hpcrl.algos.rollout import check_actor_critic_spaces
    from hpcrl.errors import UserError

    image = gym.spaces.Box(0, 255, (84, 84, 4), dtype=np.uint8)
    with pytest.raises(UserError, match="normalize_obs needs a float Box"):
        check_actor_critic_spaces("ppo", True, image, gym.spaces.Discrete(2))
    check_actor_critic_spaces("ppo", False, image, gym.spaces.Discrete(2))


def _two_layer(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def test_flat_gradients_are_views_that_backward_fills_and_clip_matches_torch():
    from mpi4py import MPI

    from hpcrl.comm.gradients import FlatGradients

    model, reference = _two_layer(0), _two_layer(0)
    flat = FlatGradients(list(model.parameters()))
    x = torch.randn(11, 5)
    for m in (model, reference):
        m.zero_grad(set_to_none=False)
        (m(x).pow(2).sum() * 10).backward()  # a norm well above 0.5
    # backward accumulated into the flat buffer: the views are still there
    views = zip(model.parameters(), flat.chunks, strict=True)
    assert all(p.grad.data_ptr() == c.data_ptr() for p, c in views)
    flat.average(MPI.COMM_SELF, watchdog_s=60)
    flat.clip(0.5)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert float(torch.linalg.vector_norm(flat.view)) == pytest.approx(0.5, rel=1e-5)


def test_flat_gradients_copy_replaced_gradients_and_reattach():
    from mpi4py import MPI

    from hpcrl.comm.gradients import FlatGradients

    model = _two_layer(1)
    flat = FlatGradients(list(model.parameters()))
    grads = [torch.full_like(p, 0.01 * (i + 1)) for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()  # a learner that sets p.grad itself (A3C's actor gradients)
    flat.clip(1e6)  # not attached: torch's clip, a no-op at this bound
    flat.average(MPI.COMM_SELF, watchdog_s=60)
    for p, c, g in zip(model.parameters(), flat.chunks, grads, strict=True):
        assert p.grad.data_ptr() == c.data_ptr()
        torch.testing.assert_close(p.grad, g)
    model.zero_grad(set_to_none=True)  # None counts as zeros
    flat.average(MPI.COMM_SELF, watchdog_s=60)
    assert float(flat.view.abs().sum()) == 0.0
