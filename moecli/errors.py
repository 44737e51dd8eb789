"""User-facing errors: one line that names the bad key and the valid choices."""


class ConfigError(ValueError):
    """A configuration the user wrote cannot run. The CLI prints `error: <message>` and exits with 2."""


def check_choice(key: str, value, choices) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_positive(key: str, value, minimum: int | float = 1) -> None:
    """Raise ConfigError unless `value >= minimum` (integers, sizes, counts)."""
    if value is None or value < minimum:
        raise ConfigError(f"{key}={value} is not valid; it must be >= {minimum}")
