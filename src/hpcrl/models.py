"""Torch networks: observation encoders, the actor-critic (PPO, IMPALA) and the Q-network (DQN).

Every network takes a batch of observations, a `torch.Tensor` or a numpy array with a leading
batch dimension B, exactly as the env's observation space describes one observation:

- `Box` of rank 0 to 2 (any dtype except an image below): flattened to (B, obs_dim) float32,
  then an MLP.
- `Discrete(n, start)`: (B,) integers, one-hot encoded to (B, n) float32, then an MLP.
- uint8 images: `Box(0, 255, (C, 84, 84))` channels-first (what gymnasium's
  `AtariPreprocessing` + `FrameStackObservation` gives), `(84, 84, C)` channels-last, or
  `(84, 84)` grayscale without a frame stack: the Nature CNN, scaled by 1/255 inside.
  Any other uint8 Box of rank >= 2 is refused rather than flattened into a huge MLP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

from hpcrl.errors import UserError, first_line

IMAGE_SIZE = 84  # Mnih et al. 2015 frames are 84 x 84; NatureCNN's fc layer assumes it
Layer = TypeVar("Layer", nn.Linear, nn.Conv2d)
ObsBatch = torch.Tensor | np.ndarray  # (B, *observation_space.shape)


class LazyOptimizer:
    """A learner's optimizer, made at the first `make_optimizer()` (or use of `optimizer`):
    a rank that only acts never makes one, since a process's first `torch.optim`
    optimizer imports `torch._dynamo` (~1.5 s of CPU). A subclass implements
    `_new_optimizer()`; the layouts call `make_optimizer()` on a learner before its first
    update, so that the import does not land inside it."""

    _optimizer: torch.optim.Optimizer | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = self._new_optimizer()
        return self._optimizer

    def _new_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError


def layer_init(layer: Layer, std: float = math.sqrt(2), bias: float = 0.0) -> Layer:
    """Orthogonal weights with gain `std`, constant bias (OpenAI Baselines / CleanRL convention).

    sqrt(2) for hidden layers, 0.01 for policy outputs (a near-uniform initial policy),
    1.0 for value outputs.
    """
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class MLPEncoder(nn.Module):
    """Flat vectors to features: Linear + activation per hidden layer (CleanRL PPO trunk).

    Input: (B, *shape) of any dtype with prod(shape) == obs_dim, flattened to (B, obs_dim)
    float32. Output: (B, out_dim) float32, out_dim = hidden[-1] (obs_dim if hidden is empty).
    """

    def __init__(
        self,
        obs_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_dim = obs_dim
        for width in hidden:
            layers += [layer_init(nn.Linear(in_dim, width)), activation()]
            in_dim = width
        self.net = nn.Sequential(*layers)
        self.obs_dim = obs_dim
        self.out_dim = in_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.reshape(obs.shape[0], -1).float())


class OneHotMLPEncoder(MLPEncoder):
    """`Discrete(n, start)` observations to features: one-hot, then `MLPEncoder`.

    Input: (B,) integers in [start, start + n). Output: (B, out_dim) float32.
    """

    def __init__(
        self,
        n: int,
        start: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
    ):
        super().__init__(n, hidden, activation)
        self.start = start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(obs.reshape(-1).long() - self.start, self.obs_dim)
        return self.net(one_hot.float())


class NatureCNN(nn.Module):
    """The DQN torso of Mnih et al. 2015 (Nature), Methods "Model architecture".

    conv 32 8x8 stride 4, conv 64 4x4 stride 2, conv 64 3x3 stride 1, fc 512, ReLU after each.
    Input: (B, C, 84, 84) uint8 pixels, or (B, 84, 84, C) when `channels_last`, or
    (B, 84, 84) when in_channels == 1; scaled to [0, 1] inside. Output: (B, 512) float32.
    """

    def __init__(self, in_channels: int, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.net = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)),
            nn.ReLU(),
        )
        self.out_dim = 512

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dim() == 3:  # (B, 84, 84): one grayscale frame, no frame stack
            obs = obs.unsqueeze(1)
        elif self.channels_last:
            obs = obs.permute(0, 3, 1, 2)
        return self.net(obs.float() / 255.0)


def _image_layout(space: gym.Space) -> tuple[int, bool] | None:
    """(in_channels, channels_last) if `space` is a uint8 image, None if it is not an image.

    Raises:
        UserError: a uint8 Box of rank >= 2 that is not 84 x 84.
    """
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8):
        return None
    shape, size = space.shape, (IMAGE_SIZE, IMAGE_SIZE)
    if len(shape) < 2:
        return None
    if shape == size:
        return 1, False
    if len(shape) == 3 and shape[1:] == size:
        return shape[0], False
    if len(shape) == 3 and shape[:2] == size:
        return shape[2], True
    raise UserError(
        f"image observations must be uint8 (C, 84, 84), (84, 84, C) or (84, 84), got {space}; "
        "for ALE ids set atari_preprocessing=true (AtariPreprocessing + FrameStackObservation)"
    )


def make_encoder(
    observation_space: gym.Space,
    hidden: Sequence[int] = (64, 64),
    activation: type[nn.Module] = nn.Tanh,
) -> MLPEncoder | NatureCNN:
    """The encoder for one observation space (see the module docstring for the rules).

    `hidden` and `activation` apply to the MLP only; images always get `NatureCNN`.
    The returned module maps (B, *observation_space.shape) to (B, encoder.out_dim) float32.

    Raises:
        UserError: a space other than Box or Discrete (Dict, Tuple, MultiDiscrete, ...), or a
            uint8 image that is not 84 x 84.
    """
    image = _image_layout(observation_space)
    if image is not None:
        in_channels, channels_last = image
        return NatureCNN(in_channels, channels_last)
    if isinstance(observation_space, gym.spaces.Box):
        return MLPEncoder(int(np.prod(observation_space.shape)), hidden, activation)
    if isinstance(observation_space, gym.spaces.Discrete):
        n, start = int(observation_space.n), int(observation_space.start)
        return OneHotMLPEncoder(n, start, hidden, activation)
    raise UserError(f"unsupported observation space {observation_space}: use a Box or Discrete")


def check_device(requested: str) -> None:
    """Raises UserError if `requested` is `cuda` and torch sees no CUDA GPU."""
    if requested != "cpu" and not torch.cuda.is_available():
        raise UserError(
            f"device {requested!r}: torch sees no CUDA GPU on this node "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use --device cpu or a CUDA build of torch on a GPU node"
        )


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """The torch device of a rank's model: `cpu`, or for `cuda` GPU `local_rank mod n` of
    the node's n visible GPUs (so ranks on one node spread over its GPUs).

    Raises:
        UserError: `cuda` requested where torch sees no CUDA GPU.
    """
    check_device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)  # no stray context on GPU 0 from every rank
    return device


def _as_batch(obs: ObsBatch, module: nn.Module) -> torch.Tensor:
    """Observations as a tensor on the module's device (no copy if already there)."""
    return torch.as_tensor(obs, device=next(module.parameters()).device)


def _num_discrete_actions(action_space: gym.Space, network: str) -> int | None:
    """n for `Discrete(n)`, None for anything else.

    Raises:
        UserError: `Discrete(n, start)` with start != 0 (networks output indices 0..n-1).
    """
    if not isinstance(action_space, gym.spaces.Discrete):
        return None
    if int(action_space.start) != 0:
        raise UserError(f"{network} needs Discrete actions starting at 0, got {action_space}")
    return int(action_space.n)


class ActorCritic(nn.Module):
    """Policy and state-value networks for on-policy learners (CleanRL `ppo.py` layout).

    Vector observations: separate policy and value MLP trunks (`hidden` widths, tanh by
    default), one shared trunk when `shared`. Images: one shared `NatureCNN` (CleanRL
    `ppo_atari.py`), `hidden` unused. `encoder` (a module with `out_dim`, e.g. from
    `custom_encoder`) replaces either as the shared trunk. Heads: logits for `Discrete(n)`
    actions (a categorical policy), the mean for 1-D `Box` actions with a state-independent
    learnable `log_std` initialised to 0 (a diagonal Gaussian; actions are not squashed or
    clipped here, clip in the env as CleanRL does). Policy head init std 0.01, value head 1.0.

    Observations `obs` below are (B, *observation_space.shape) tensors or numpy arrays.
    Actions are (B,) int64 for Discrete and (B, action_dim) float32 for Box.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden: Sequence[int] = (64, 64),
        shared: bool = False,
        activation: type[nn.Module] = nn.Tanh,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        n_actions = _num_discrete_actions(action_space, "ActorCritic")
        self.continuous = n_actions is None
        if self.continuous:
            if not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1):
                raise UserError(
                    f"ActorCritic needs Discrete or 1-D Box actions, got {action_space}"
                )
            n_actions = action_space.shape[0]

        if encoder is not None or shared or _image_layout(observation_space) is not None:
            self.encoder = (
                make_encoder(observation_space, hidden, activation) if encoder is None else encoder
            )
            self.actor_trunk, self.critic_trunk = nn.Identity(), nn.Identity()
            actor_dim = critic_dim = self.encoder.out_dim
        else:
            self.encoder = nn.Identity()
            self.actor_trunk = make_encoder(observation_space, hidden, activation)
            self.critic_trunk = make_encoder(observation_space, hidden, activation)
            actor_dim, critic_dim = self.actor_trunk.out_dim, self.critic_trunk.out_dim
        self.actor_head = layer_init(nn.Linear(actor_dim, n_actions), std=0.01)
        self.critic_head = layer_init(nn.Linear(critic_dim, 1), std=1.0)
        if self.continuous:
            self.log_std = nn.Parameter(torch.zeros(n_actions))

    def _features(self, obs: ObsBatch) -> torch.Tensor:
        return self.encoder(_as_batch(obs, self))

    def _log_pi(self, features: torch.Tensor) -> torch.Tensor:
        """Discrete actions: log π(·|s), (B, n) float32. `act` and `evaluate_actions` use
        it rather than a `Categorical`, whose construction and argument checks cost more
        than the network on CartPole-sized inputs (same sampling rule and values)."""
        return F.log_softmax(self.actor_head(self.actor_trunk(features)), dim=-1)

    def _policy(self, features: torch.Tensor) -> Distribution:
        out = self.actor_head(self.actor_trunk(features))
        if self.continuous:
            return Normal(out, self.log_std.exp().expand_as(out))
        return Categorical(logits=out)

    def _value(self, features: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.critic_trunk(features)).squeeze(-1)

    def _log_prob(self, dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            return dist.log_prob(actions).sum(-1)  # independent dimensions
        return dist.log_prob(actions.long())

    def _entropy(self, dist: Distribution) -> torch.Tensor:
        return dist.entropy().sum(-1) if self.continuous else dist.entropy()

    def value(self, obs: ObsBatch) -> torch.Tensor:
        """V(s): (B,) float32."""
        return self._value(self._features(obs))

    def distribution(self, obs: ObsBatch) -> Distribution:
        """The policy π(·|s), with gradients.

        Returns:
            `Categorical` with batch shape (B,) for Discrete actions, or `Normal` with batch
            shape (B, action_dim) for Box actions, whose `log_prob` and `entropy` must be
            summed over the last dim (`act` and `evaluate_actions` do that for you).
        """
        return self._policy(self._features(obs))

    @torch.no_grad()
    def act(
        self, obs: ObsBatch, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions for actors, without gradients.

        Args:
            obs: (B, *observation_space.shape).
            deterministic: take the mode (argmax of the logits, or the Gaussian mean) instead
                of sampling.

        Returns:
            actions: (B,) int64 or (B, action_dim) float32.
            log_probs: (B,) float32, log π(a|s) of the returned actions (the behaviour
                policy's log-probabilities for PPO ratios and V-trace importance weights).
            values: (B,) float32, V(s).
        """
        features = self._features(obs)
        values = self._value(features)
        if not self.continuous:
            log_pi = self._log_pi(features)
            if deterministic:
                actions = log_pi.argmax(-1)
            else:  # what `Categorical.sample` does, without building the distribution
                actions = torch.multinomial(log_pi.exp(), 1, True).squeeze(-1)
            return actions, log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1), values
        dist = self._policy(features)
        actions = dist.mean if deterministic else dist.sample()
        return actions, self._log_prob(dist, actions), values

    def evaluate_actions(
        self, obs: ObsBatch, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable log π(a|s), policy entropy and V(s) for the learner's loss.

        Args:
            obs: (B, *observation_space.shape).
            actions: (B,) integers or (B, action_dim) float32, e.g. from `act`.

        Returns:
            log_probs: (B,) float32.
            entropy: (B,) float32, in nats.
            values: (B,) float32.
        """
        features = self._features(obs)
        values = self._value(features)
        actions = torch.as_tensor(actions, device=values.device)
        if not self.continuous:
            log_pi = self._log_pi(features)
            log_probs = log_pi.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            return log_probs, -(log_pi.exp() * log_pi).sum(-1), values
        dist = self._policy(features)
        return self._log_prob(dist, actions), self._entropy(dist), values


class QNetwork(nn.Module):
    """Action values Q(s, ·) for `Discrete(n)` actions (CleanRL `dqn.py` / `dqn_atari.py`).

    Vector observations: an MLP (`hidden`, CleanRL's (120, 84) by default, ReLU by
    default); images: `NatureCNN`, `hidden` unused; `encoder` (a module with `out_dim`,
    e.g. from `custom_encoder`) replaces either. Weights: PyTorch's default initialization. With
    `dueling`, a value stream V(s) and an advantage stream A(s, ·), each one linear layer on
    the shared features, are combined as Q = V + A - mean_a A (Wang et al. 2016, Eq. 9).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden: Sequence[int] = (120, 84),
        dueling: bool = False,
        activation: type[nn.Module] = nn.ReLU,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        n_actions = _num_discrete_actions(action_space, "QNetwork")
        if n_actions is None:
            raise UserError(f"QNetwork needs Discrete actions, got {action_space}")
        custom = encoder is not None
        self.encoder = encoder if custom else make_encoder(observation_space, hidden, activation)
        features = self.encoder.out_dim
        self.dueling = dueling
        # Q(s, ·), or the advantage stream A(s, ·) when dueling
        self.head = nn.Linear(features, n_actions)
        self.value_head = nn.Linear(features, 1) if dueling else None
        # PyTorch's default initialization everywhere, as CleanRL's and SB3's DQN: on
        # CartPole the orthogonal init of the actor-critic (gain √2) made DQN less stable
        # (best 20-episode mean 300 vs 450 in 60k steps with RL Zoo's hyperparameters).
        # A user's encoder keeps the initialization it was made with.
        for module in (self.head, self.value_head) if custom else self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.reset_parameters()

    def forward(self, obs: ObsBatch) -> torch.Tensor:
        """Q(s, a) for every action: (B, n_actions) float32 from obs (B, *obs_shape)."""
        features = self.encoder(_as_batch(obs, self))
        q_values = self.head(features)
        if self.value_head is not None:
            q_values = self.value_head(features) + q_values - q_values.mean(-1, keepdim=True)
        return q_values


# -- networks from an algorithm's config (`hpcrl.algos.network.NetworkConfig`) -------------

_network_fn = None  # hpcrl.train(network_fn=...): the user's encoder in this process


def set_network_fn(network_fn):
    """Make `network_fn` the encoder of the networks built from a config with
    `custom_network` (None: none); returns the previous one. `hpcrl.train` and
    `hpcrl.load_policy` set it around the run."""
    global _network_fn
    previous, _network_fn = _network_fn, network_fn
    return previous


class CustomEncoder(nn.Module):
    """A user's module (`network_fn(observation_space)`) with the `out_dim` the heads need."""

    def __init__(self, net: nn.Module, out_dim: int):
        super().__init__()
        self.net, self.out_dim = net, out_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def custom_encoder(observation_space: gym.Space) -> CustomEncoder:
    """The encoder `network_fn(observation_space)` builds, checked on a batch of two
    `observation_space.sample()`s, a tensor (2, *observation_space.shape) in the env's dtype.

    Raises:
        UserError: no `network_fn` set (a run trained with one, resumed or loaded without
            it); it returns something other than a `torch.nn.Module`; the module raises on
            the batch, or returns anything but a floating tensor of shape (2, F).
    """
    if _network_fn is None:
        raise UserError(
            "this run's config has custom_network: true (a network_fn given to hpcrl.train): "
            "pass the same network_fn to hpcrl.train or hpcrl.load_policy"
        )
    name = getattr(_network_fn, "__name__", repr(_network_fn))
    net = _network_fn(observation_space)
    if not isinstance(net, nn.Module):
        raise UserError(
            f"network_fn {name} returned a {type(net).__name__}: expected a torch.nn.Module"
        )
    obs = torch.as_tensor(np.stack([observation_space.sample() for _ in range(2)]))
    try:
        with torch.no_grad():
            out = net(obs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module
        raise UserError(
            f"network_fn {name}: its module failed on a batch of 2 observations "
            f"{tuple(obs.shape)} {obs.dtype}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 2):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"network_fn {name}: its module maps observations {tuple(obs.shape)} to {got}: "
            "expected features (B, F), here (2, F)"
        )
    if not out.is_floating_point():
        raise UserError(f"network_fn {name}: its module returns {out.dtype}: expected floats")
    return CustomEncoder(net, int(out.shape[1]))


def _activation(name: str) -> type[nn.Module]:
    from hpcrl.algos.network import ACTIVATIONS

    return getattr(nn, ACTIVATIONS[name])


def _network_options(cfg, observation_space: gym.Space) -> dict:
    """The `hidden`, `activation` and `encoder` arguments a `NetworkConfig` asks for."""
    return {
        "hidden": cfg.hidden(),
        "activation": _activation(cfg.activation),
        "encoder": custom_encoder(observation_space) if cfg.custom_network else None,
    }


def actor_critic(cfg, observation_space: gym.Space, action_space: gym.Space) -> ActorCritic:
    """The `ActorCritic` an algorithm's config (`NetworkConfig` keys) asks for.

    Raises:
        UserError: as `ActorCritic` and `custom_encoder`.
    """
    return ActorCritic(observation_space, action_space, **_network_options(cfg, observation_space))


def q_network(
    cfg, observation_space: gym.Space, action_space: gym.Space, dueling: bool = False
) -> QNetwork:
    """The `QNetwork` an algorithm's config (`NetworkConfig` keys) asks for.

    Raises:
        UserError: as `QNetwork` and `custom_encoder`.
    """
    options = _network_options(cfg, observation_space)
    return QNetwork(observation_space, action_space, dueling=dueling, **options)
