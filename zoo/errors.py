"""Exceptions zoo raises for bad user input. Each message says what is wrong and where."""


class ZooError(Exception):
    """Base class of zoo's own errors."""


class ConfigError(ZooError, ValueError):
    """A recipe or model config is invalid. ``path`` is the full dotted key path (``model.attention.n_heads``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` put in front of its key path."""
        path = f"{prefix}.{self.path}" if self.path else prefix
        return ConfigError(path, self.message)


class BackendUnavailableError(ZooError, RuntimeError):
    """A backend was asked for explicitly but cannot run here."""
