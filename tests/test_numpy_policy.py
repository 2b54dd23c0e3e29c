"""The actors' numpy policy (`hpcrl.numpy_policy.NumpyActorCritic`) against the torch model
it mirrors (`hpcrl.models.ActorCritic`), on random inputs and random parameters."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy import stats

from hpcrl.models import ActorCritic
from hpcrl.numpy_policy import NumpyActorCritic

SPACES = {
    "box-discrete": (gym.spaces.Box(-5, 5, (4,), np.float32), gym.spaces.Discrete(3)),
    "box2d-discrete": (gym.spaces.Box(-5, 5, (2, 3), np.float64), gym.spaces.Discrete(5)),
    "discrete-discrete": (gym.spaces.Discrete(7, start=2), gym.spaces.Discrete(4)),
    "box-box": (gym.spaces.Box(-5, 5, (6,), np.float32), gym.spaces.Box(-1, 1, (2,))),
}


def _pair(name: str, hidden=(16, 8), seed: int = 0):
    observation_space, action_space = SPACES[name]
    torch.manual_seed(seed)
    model = ActorCritic(observation_space, action_space, hidden)
    with torch.no_grad():  # random parameters everywhere, not only the initial ones
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    policy = NumpyActorCritic(observation_space, action_space, hidden, seed)
    assert policy.size == flat.size
    policy.load_published(flat)
    observation_space.seed(seed)
    obs = np.stack([observation_space.sample() for _ in range(64)])
    return model, policy, obs


@pytest.mark.parametrize("name", sorted(SPACES))
def test_probabilities_values_and_log_probs_equal_the_torch_model(name):
    model, policy, obs = _pair(name)
    with torch.no_grad():
        dist = model.distribution(obs)
        values = model.value(obs).numpy()
        greedy, _, _ = model.act(obs, deterministic=True)
    np.testing.assert_allclose(policy.values(obs), values, atol=1e-5, rtol=1e-5)
    actions, log_probs = policy.act(obs)
    with torch.no_grad():
        torch_log_probs, _, _ = model.evaluate_actions(obs, torch.as_tensor(actions))
    np.testing.assert_allclose(log_probs, torch_log_probs.numpy(), atol=1e-5, rtol=1e-5)
    if policy.continuous:
        np.testing.assert_allclose(policy.greedy_actions(obs), dist.mean.numpy(), atol=1e-6)
        assert actions.shape == (64, 2) and actions.dtype == np.float32
    else:
        probs = np.exp(policy.log_probabilities(obs))
        np.testing.assert_allclose(probs, dist.probs.numpy(), atol=1e-6)
        np.testing.assert_array_equal(policy.greedy_actions(obs), greedy.numpy())
        assert actions.shape == (64,) and actions.dtype == np.int64
    assert log_probs.dtype == np.float32 and policy.values(obs).dtype == np.float32


def test_gumbel_max_samples_follow_the_policy():
    """Chi-square goodness of fit of 40,000 draws for one observation."""
    _, policy, obs = _pair("box-discrete", seed=3)
    batch = np.repeat(obs[:1], 40_000, axis=0)
    actions, log_probs = policy.act(batch)
    expected = np.exp(policy.log_probabilities(obs[:1]))[0].astype(np.float64)
    counts = np.bincount(actions, minlength=expected.size)
    assert stats.chisquare(counts, expected / expected.sum() * counts.sum()).pvalue > 1e-3
    np.testing.assert_allclose(np.exp(log_probs), expected[actions], rtol=1e-5)


def test_gaussian_samples_have_the_policy_mean_and_std():
    _, policy, obs = _pair("box-box", seed=4)
    batch = np.repeat(obs[:1], 40_000, axis=0)
    actions, _ = policy.act(batch)
    mean, std = policy.greedy_actions(obs[:1])[0], np.exp(policy.log_std)
    np.testing.assert_allclose(actions.mean(0), mean, atol=4 * std.max() / 200)
    np.testing.assert_allclose(actions.std(0), std, rtol=0.02)


def test_same_seed_same_actions_and_loading_copies():
    model, a, obs = _pair("box-discrete", seed=5)
    b = NumpyActorCritic(*SPACES["box-discrete"], (16, 8), 5)
    flat = a.published()
    b.load_published(flat)
    flat[:] = 0.0  # nothing aliases the vector that was loaded
    np.testing.assert_array_equal(a.act(obs)[0], b.act(obs)[0])


def test_images_are_not_supported():
    image = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert not NumpyActorCritic.supports(image, gym.spaces.Discrete(6))
    assert not NumpyActorCritic.supports(SPACES["box-discrete"][0], gym.spaces.Discrete(3, start=1))
    with pytest.raises(ValueError, match="no numpy policy"):
        NumpyActorCritic(image, gym.spaces.Discrete(6), (8,), 0)
