"""The project's exceptions; the WAMP adapters map the ones with a ``uri`` to WAMP errors."""

from components.wamp import uris


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the key, the value and what was expected."""


class IotError(Exception):
    """An error a caller of a query procedure gets, as the WAMP error ``uri``."""

    uri = ""


class InvalidArgument(IotError):
    """A query argument has the wrong type or value."""

    uri = uris.ERROR_INVALID_ARGUMENT


class TooManyResults(IotError):
    """An answer is larger than the configured maximum and the caller did not ask for progressive results."""

    uri = uris.ERROR_TOO_MANY_RESULTS


class StorageUnavailable(IotError):
    """The storage backend cannot be reached or is not set up."""

    uri = uris.ERROR_STORAGE_UNAVAILABLE


class DecryptionFailed(IotError):
    """A sealed record does not open: wrong or missing key, or the record was tampered with."""

    uri = uris.ERROR_DECRYPTION_FAILED
