"""Project error classes. Messages name the bad field or thing and say how to fix it."""


class IncrementalError(Exception):
    """Base class for errors a user can act on."""


class InvalidFeedbackError(IncrementalError, ValueError):
    """Feedback input was refused; nothing was stored."""


class RegistryError(IncrementalError):
    """A version-registry operation was refused (unknown version, rejected target, bad folder)."""


class ConfigurationError(IncrementalError, ValueError):
    """Settings or run configuration do not fit together (e.g. a parent trained on another base)."""
