"""The one error type of a bad configuration value, raised by every component's config and by the composition."""


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` is one line naming the key and what is allowed.

    A component raises it with its own field name (``ConfigError("lr", ...)``); the composition in
    ``experiments/config.py`` re-raises it under the full dotted key (``optim.lr``) with :meth:`under`.

    Example:
        >>> str(ConfigError("lr", "-1.0 must be > 0").under("optim"))
        'config error at `optim.lr`: -1.0 must be > 0'
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at `{key}`: {message}")
        self.key = key
        self.message = message

    def under(self, section: str) -> "ConfigError":
        """The same error with ``section`` prepended to its key."""
        return ConfigError(f"{section}.{self.key}", self.message)


def error_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty), at most ``limit``
    characters: what a one-line report says of an exception that came from a library."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def check_at_least(key: str, value: float, low: float, *, exclusive: bool = False, note: str = "") -> None:
    """Raises ConfigError(key) unless ``value >= low`` (``value > low`` when ``exclusive``); ``note`` says why."""
    if value < low or (exclusive and value == low):
        raise ConfigError(key, f"{value} must be {'>' if exclusive else '>='} {low}" + (f" ({note})" if note else ""))
