"""The project's exceptions; the WAMP adapters map the :class:`IotError` ones to WAMP errors."""


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the key, the value and what was expected."""


class IotError(Exception):
    """An error a caller of a query procedure gets (as a WAMP error, mapped by the adapter)."""


class InvalidArgument(IotError):
    """A query argument has the wrong type or value."""


class TooManyResults(IotError):
    """An answer is larger than the configured maximum and the caller did not ask for progressive results."""


class StorageUnavailable(IotError):
    """The storage backend cannot be reached or is not set up."""


class DecryptionFailed(IotError):
    """A sealed record does not open: wrong or missing key, or the record was tampered with."""
