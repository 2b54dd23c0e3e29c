"""The network keys every deep algorithm shares (importable without torch: IMPALA's actor
ranks read them). The networks themselves are `hpcrl.models`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpcrl.errors import ConfigError

# `activation` key -> the torch.nn module applied after each hidden layer of an MLP
ACTIVATIONS = {"tanh": "Tanh", "relu": "ReLU", "elu": "ELU", "gelu": "GELU", "silu": "SiLU"}


@dataclass
class NetworkConfig:
    """The MLP of a deep algorithm: `hidden_sizes` (or two layers of `hidden_size`) and
    the `activation` after each. Image observations always get the Nature CNN; a
    `network_fn` given to `hpcrl.train` replaces both (`custom_network`)."""

    hidden_size: int = 64  # width of each of two hidden layers, unless hidden_sizes is set
    hidden_sizes: list[int] = field(default_factory=list)  # e.g. [256, 256]; [] -> hidden_size
    activation: str = "tanh"  # one of ACTIVATIONS
    # set by hpcrl.train(network_fn=...): the encoder is the user's module, not the MLP
    custom_network: bool = False

    def hidden(self) -> tuple[int, ...]:
        """The hidden layer widths of the MLP."""
        return tuple(self.hidden_sizes) or (self.hidden_size, self.hidden_size)

    def validate_network(self) -> None:
        """Raises ConfigError for a width < 1 or an unknown activation."""
        if self.hidden_size < 1:
            raise ConfigError(
                f"config key 'hidden_size': got {self.hidden_size!r}, expected an integer >= 1"
            )
        if any(width < 1 for width in self.hidden_sizes):
            raise ConfigError(
                f"config key 'hidden_sizes': got {self.hidden_sizes!r}, expected a list of "
                "integers >= 1 (or [] for two layers of hidden_size)"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"config key 'activation': got {self.activation!r}, expected one of "
                f"{list(ACTIVATIONS)}"
            )
