"""Exceptions that mean "the user's input is wrong": printed as one line, exit status 2."""


class UserError(Exception):
    """Bad input (config value, env id, run directory, checkpoint).

    The message is one line that names the bad value and what was expected. The runner
    prints it without a traceback; when every rank raises it together the job exits with
    status 2, when one rank raises it alone the whole job is aborted with status 2.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key, type or value that is not valid."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or fails its checksum."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" for none): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_integers_at_least(keys: tuple[tuple[str, int, int], ...]) -> None:
    """Raise ConfigError naming the first (key, value, lowest) whose value is below its
    lowest: the integer checks of the layouts' settings dataclasses."""
    for key, value, low in keys:
        if value < low:
            raise ConfigError(f"config key '{key}': got {value!r}, expected an integer >= {low}")
