"""Networks in `hpcrl.models`: shapes and dtypes per space, distributions against their
closed forms, seeding, gradient flow, and refused spaces."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from hpcrl.errors import UserError
from hpcrl.models import ActorCritic, MLPEncoder, NatureCNN, QNetwork, layer_init, make_encoder

B = 5
IMAGE = spaces.Box(0, 255, (4, 84, 84), np.uint8)

# name: (observation space, action space)
SPACES = {
    "cartpole": (spaces.Box(-np.inf, np.inf, (4,), np.float32), spaces.Discrete(2)),
    "pendulum": (spaces.Box(-8.0, 8.0, (3,), np.float32), spaces.Box(-2.0, 2.0, (1,))),
    "frozenlake": (spaces.Discrete(16), spaces.Discrete(4)),
    "image": (IMAGE, spaces.Discrete(6)),
    "image_box_actions": (IMAGE, spaces.Box(-1.0, 1.0, (3,), np.float32)),
}


def batch(space: gym.Space, seed: int = 0) -> np.ndarray:
    space.seed(seed)
    return np.stack([space.sample() for _ in range(B)])


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("shared", [False, True])
def test_actor_critic_shapes_and_dtypes(name, shared):
    obs_space, act_space = SPACES[name]
    model = ActorCritic(obs_space, act_space, shared=shared)
    actions, log_probs, values = model.act(batch(obs_space))
    if isinstance(act_space, spaces.Discrete):
        assert actions.shape == (B,) and actions.dtype == torch.int64
        assert ((actions >= 0) & (actions < act_space.n)).all()
    else:
        assert actions.shape == (B, act_space.shape[0]) and actions.dtype == torch.float32
    for out in (log_probs, values, model.value(batch(obs_space))):
        assert out.shape == (B,) and out.dtype == torch.float32
    assert not log_probs.requires_grad and not values.requires_grad
    log_probs2, entropy, values2 = model.evaluate_actions(batch(obs_space), actions)
    for out in (log_probs2, entropy, values2):
        assert out.shape == (B,) and out.dtype == torch.float32 and out.requires_grad


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("dueling", [False, True])
def test_q_network_shapes(name, dueling):
    obs_space, act_space = SPACES[name]
    if not isinstance(act_space, spaces.Discrete):
        with pytest.raises(UserError, match="QNetwork needs Discrete actions"):
            QNetwork(obs_space, act_space, dueling=dueling)
        return
    q_values = QNetwork(obs_space, act_space, dueling=dueling)(batch(obs_space))
    assert q_values.shape == (B, act_space.n) and q_values.dtype == torch.float32


def test_dueling_combines_value_and_mean_centred_advantage():
    obs_space, act_space = SPACES["cartpole"]
    net = QNetwork(obs_space, act_space, dueling=True)
    obs = torch.as_tensor(batch(obs_space))
    features = net.encoder(obs)
    value, advantage = net.value_head(features), net.head(features)
    expected = value + advantage - advantage.mean(-1, keepdim=True)  # Wang et al. 2016, Eq. 9
    torch.testing.assert_close(net(obs), expected)
    # mean over actions of Q is V
    torch.testing.assert_close(net(obs).mean(-1), value.squeeze(-1))


@pytest.mark.parametrize("name", ["cartpole", "pendulum", "frozenlake", "image"])
def test_act_then_evaluate_gives_the_same_log_probs(name):
    obs_space, act_space = SPACES[name]
    torch.manual_seed(0)
    model = ActorCritic(obs_space, act_space)
    obs = batch(obs_space)
    actions, log_probs, values = model.act(obs)
    log_probs2, _, values2 = model.evaluate_actions(obs, actions)
    torch.testing.assert_close(log_probs2.detach(), log_probs)
    torch.testing.assert_close(values2.detach(), values)


def test_deterministic_actions_are_argmax_and_mean():
    obs_space, act_space = SPACES["cartpole"]
    model = ActorCritic(obs_space, act_space)
    obs = batch(obs_space)
    actions, _, _ = model.act(obs, deterministic=True)
    assert torch.equal(actions, model.distribution(obs).probs.argmax(-1))

    obs_space, act_space = SPACES["pendulum"]
    model = ActorCritic(obs_space, act_space)
    with torch.no_grad():
        model.log_std.fill_(0.3)
    obs = batch(obs_space)
    actions, _, _ = model.act(obs, deterministic=True)
    mean = model.actor_head(model.actor_trunk(torch.as_tensor(obs))).detach()
    assert torch.equal(actions, mean)


def test_gaussian_log_prob_is_the_diagonal_normal_density():
    obs_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    act_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    model = ActorCritic(obs_space, act_space)
    with torch.no_grad():
        model.log_std.copy_(torch.tensor([-0.5, 0.7]))
    obs = batch(obs_space)
    actions = torch.randn(B, 2)
    log_probs, entropy, _ = model.evaluate_actions(obs, actions)

    mean = model.actor_head(model.actor_trunk(torch.as_tensor(obs))).detach().double()
    std = torch.tensor([math.exp(-0.5), math.exp(0.7)], dtype=torch.float64)
    a = actions.double()
    # log N(a; mu, diag(sigma^2)) = sum_i [-(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i
    # - log(2 pi) / 2]
    expected = sum(
        -((a[:, i] - mean[:, i]) ** 2) / (2 * std[i] ** 2)
        - math.log(std[i])
        - 0.5 * math.log(2 * math.pi)
        for i in range(2)
    )
    torch.testing.assert_close(log_probs.double(), expected)
    # entropy of a diagonal Gaussian: sum_i [1/2 log(2 pi e) + log sigma_i]
    expected_entropy = 2 * 0.5 * math.log(2 * math.pi * math.e) + (-0.5 + 0.7)
    torch.testing.assert_close(entropy.double(), torch.full((B,), expected_entropy).double())


def test_categorical_entropy_and_log_prob_from_softmax():
    obs_space, act_space = spaces.Box(-1.0, 1.0, (3,), np.float32), spaces.Discrete(4)
    model = ActorCritic(obs_space, act_space)
    with torch.no_grad():  # make the policy far from uniform so the check means something
        model.actor_head.weight.mul_(300.0)
    obs = batch(obs_space)
    actions = torch.tensor([0, 1, 2, 3, 1])
    log_probs, entropy, _ = model.evaluate_actions(obs, actions)

    logits = model.actor_head(model.actor_trunk(torch.as_tensor(obs))).detach().double()
    for row in range(B):
        z = sum(math.exp(logits[row, j]) for j in range(4))
        p = [math.exp(logits[row, j]) / z for j in range(4)]
        assert abs(entropy[row].item() + sum(pj * math.log(pj) for pj in p)) < 1e-5
        assert abs(log_probs[row].item() - math.log(p[actions[row]])) < 1e-5
    assert entropy.min() < 0.9 * math.log(4)


@pytest.mark.parametrize("name", SPACES)
def test_same_seed_gives_bit_identical_parameters(name):
    obs_space, act_space = SPACES[name]

    def build(seed):
        torch.manual_seed(seed)
        return ActorCritic(obs_space, act_space), QNetwork(obs_space, spaces.Discrete(3))

    first, second, other = build(0), build(0), build(1)
    for net_a, net_b, net_c in zip(first, second, other, strict=True):
        state_a, state_b, state_c = net_a.state_dict(), net_b.state_dict(), net_c.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("shared", [False, True])
def test_ppo_loss_reaches_every_parameter(name, shared):
    obs_space, act_space = SPACES[name]
    model = ActorCritic(obs_space, act_space, shared=shared)
    obs = batch(obs_space)
    actions, old_log_probs, _ = model.act(obs)
    advantages, returns = torch.randn(B), torch.randn(B)

    log_probs, entropy, values = model.evaluate_actions(obs, actions)
    ratio = (log_probs - old_log_probs).exp()
    policy_loss = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()
    value_loss = 0.5 * ((values - returns) ** 2).mean()
    (policy_loss + 0.5 * value_loss - 0.01 * entropy.mean()).backward()

    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("dueling", [False, True])
def test_td_loss_reaches_every_q_parameter(dueling):
    obs_space, act_space = SPACES["cartpole"]
    net = QNetwork(obs_space, act_space, dueling=dueling)
    obs = batch(obs_space)
    actions = torch.tensor([0, 1, 0, 1, 1])
    q_taken = net(obs).gather(1, actions[:, None]).squeeze(1)
    ((q_taken - torch.randn(B)) ** 2).mean().backward()
    for param_name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_shared_and_separate_trunks():
    obs_space, act_space = SPACES["cartpole"]
    separate = ActorCritic(obs_space, act_space)
    shared = ActorCritic(obs_space, act_space, shared=True)
    assert sum(p.numel() for p in separate.parameters()) > sum(
        p.numel() for p in shared.parameters()
    )
    assert isinstance(separate.actor_trunk, MLPEncoder)
    assert separate.actor_trunk is not separate.critic_trunk
    image_model = ActorCritic(*SPACES["image"])
    assert isinstance(image_model.encoder, NatureCNN)  # the CNN is always shared


def test_make_encoder_picks_by_space():
    mlp = make_encoder(spaces.Box(-1.0, 1.0, (3, 2, 2), np.float32), hidden=(7,))
    assert isinstance(mlp, MLPEncoder) and mlp.obs_dim == 12 and mlp.out_dim == 7
    assert mlp(torch.zeros(B, 3, 2, 2)).shape == (B, 7)
    ram = make_encoder(spaces.Box(0, 255, (128,), np.uint8))  # Atari RAM is a vector
    assert isinstance(ram, MLPEncoder)

    one_hot = make_encoder(spaces.Discrete(5, start=10), hidden=())
    # with no hidden layers the features are the one-hot vector itself
    torch.testing.assert_close(one_hot(torch.tensor([10, 14])), torch.eye(5)[[0, 4]])

    for shape, channels in [((4, 84, 84), 4), ((84, 84, 3), 3), ((84, 84), 1)]:
        cnn = make_encoder(spaces.Box(0, 255, shape, np.uint8))
        assert isinstance(cnn, NatureCNN) and cnn.net[0].in_channels == channels
        assert cnn(torch.zeros((B, *shape), dtype=torch.uint8)).shape == (B, 512)


def test_channels_last_image_matches_channels_first():
    torch.manual_seed(0)
    first = make_encoder(spaces.Box(0, 255, (3, 84, 84), np.uint8))
    torch.manual_seed(0)
    last = make_encoder(spaces.Box(0, 255, (84, 84, 3), np.uint8))
    pixels = torch.randint(0, 256, (2, 3, 84, 84), dtype=torch.uint8)
    torch.testing.assert_close(first(pixels), last(pixels.permute(0, 2, 3, 1)))


def test_nature_cnn_scales_pixels_by_1_over_255():
    torch.manual_seed(0)
    cnn = NatureCNN(4)
    pixels = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    torch.testing.assert_close(cnn(pixels), cnn.net(pixels.float() / 255.0))


def test_layer_init_is_orthogonal_with_gain():
    layer = layer_init(torch.nn.Linear(8, 4), std=0.01, bias=0.5)
    w = layer.weight.detach()
    torch.testing.assert_close(w @ w.T, 0.01**2 * torch.eye(4))
    assert torch.equal(layer.bias.detach(), torch.full((4,), 0.5))


def test_log_std_starts_at_zero():
    model = ActorCritic(*SPACES["pendulum"])
    assert torch.equal(model.log_std.detach(), torch.zeros(1))


@pytest.mark.parametrize(
    "obs_space, act_space, match",
    [
        (spaces.Dict({"x": spaces.Discrete(2)}), spaces.Discrete(2), "observation space Dict"),
        (spaces.Tuple((spaces.Discrete(2),)), spaces.Discrete(2), "observation space Tuple"),
        (spaces.MultiDiscrete([2, 3]), spaces.Discrete(2), "observation space MultiDiscrete"),
        (spaces.Box(0, 255, (210, 160, 3), np.uint8), spaces.Discrete(2), r"\(210, 160, 3\)"),
        (SPACES["cartpole"][0], spaces.MultiDiscrete([2, 2]), "actions, got MultiDiscrete"),
        (SPACES["cartpole"][0], spaces.Box(-1.0, 1.0, (2, 2)), "1-D Box actions"),
        (SPACES["cartpole"][0], spaces.Discrete(3, start=1), "starting at 0"),
    ],
)
def test_unsupported_spaces_raise_one_line_user_error(obs_space, act_space, match):
    for build in (ActorCritic, QNetwork):
        if build is QNetwork and isinstance(act_space, spaces.Box):
            continue
        with pytest.raises(UserError, match=match) as info:
            build(obs_space, act_space)
        assert "\n" not in str(info.value)
