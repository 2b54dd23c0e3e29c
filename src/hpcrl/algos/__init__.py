"""One module per algorithm: its config dataclass and its update math; nothing about ranks."""
