"""Every WAMP URI of the sensor hub, in one place (the README's URI table is checked against this module)."""

from components.core.errors import DecryptionFailed, InvalidArgument, IotError, StorageUnavailable, TooManyResults

REALM = "iot"

# Topics
SENSOR_PREFIX = "iot.sensor."
"""Prefix of ``iot.sensor.<device_id>.<sensor_type>``: one reading or a list of readings."""
ACK_PREFIX = "iot.ack."
"""Prefix of ``iot.ack.<device_id>``: ``{"seq": N}`` once every reading with ``seq <= N`` is stored."""

# Procedures
FETCH_BETWEEN_WINDOW = "iot.fetch_between_window"
FETCH_SINCE = "iot.fetch_since"
FETCH_LAST_N_SEC = "iot.fetch_last_n_sec"
FETCH_LAST_WINDOW = "iot.fetch_last_window"
FETCH_ALL = "iot.fetch_all"
GET_MAX_REL_TIME = "iot.get_max_rel_time"
LIST_DEVICES = "iot.list_devices"
GET_LATEST = "iot.get_latest"
AGGREGATE = "iot.aggregate"
GET_AUDIT = "iot.get_audit"
GET_STATS = "iot.get_stats"

PROCEDURES = (
    FETCH_BETWEEN_WINDOW,
    FETCH_SINCE,
    FETCH_LAST_N_SEC,
    FETCH_LAST_WINDOW,
    FETCH_ALL,
    GET_MAX_REL_TIME,
    LIST_DEVICES,
    GET_LATEST,
    AGGREGATE,
    GET_AUDIT,
    GET_STATS,
)

# Errors
ERROR_INVALID_ARGUMENT = "iot.error.invalid_argument"
ERROR_TOO_MANY_RESULTS = "iot.error.too_many_results"
ERROR_STORAGE_UNAVAILABLE = "iot.error.storage_unavailable"
ERROR_DECRYPTION_FAILED = "iot.error.decryption_failed"

ERRORS = (
    ERROR_INVALID_ARGUMENT,
    ERROR_TOO_MANY_RESULTS,
    ERROR_STORAGE_UNAVAILABLE,
    ERROR_DECRYPTION_FAILED,
)

ERROR_OF: dict[type[IotError], str] = {
    InvalidArgument: ERROR_INVALID_ARGUMENT,
    TooManyResults: ERROR_TOO_MANY_RESULTS,
    StorageUnavailable: ERROR_STORAGE_UNAVAILABLE,
    DecryptionFailed: ERROR_DECRYPTION_FAILED,
}


def error_uri(err: IotError) -> str:
    """The WAMP error a caller gets for one of the project's exceptions."""
    return next(uri for cls, uri in ERROR_OF.items() if isinstance(err, cls))


def sensor_topic(device_id: str, sensor_type: str) -> str:
    """The topic a device publishes readings of one sensor type to."""
    return f"{SENSOR_PREFIX}{device_id}.{sensor_type}"


def ack_topic(device_id: str) -> str:
    """The topic storage acknowledges a device's readings on."""
    return f"{ACK_PREFIX}{device_id}"


def parse_sensor_topic(topic: str) -> tuple[str, str] | None:
    """Split ``iot.sensor.<device_id>.<sensor_type>``; None when the topic has another shape."""
    parts = topic.split(".")
    if len(parts) != 4 or parts[0] != "iot" or parts[1] != "sensor":
        return None
    return parts[2], parts[3]
