"""Deterministic readings of the classic data model: devices 0 to 50, humidity and temperature, 0 to 100.

The same seed gives the same values for each (device, sensor type), whatever the interleaving or the
number of devices simulated alongside.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CLASSIC_DEVICES = tuple(str(i) for i in range(51))
CLASSIC_SENSOR_TYPES = ("humidity", "temperature")
CLASSIC_START = 1499126400.0  # 2017-07-04T00:00:00Z
CLASSIC_END = 1530662400.0  # 2018-07-04T00:00:00Z
VALUE_MIN, VALUE_MAX = 0.0, 100.0


class SensorSeries:
    """Values of one (device, sensor type): a bounded random walk, reproducible from the seed."""

    def __init__(self, seed: int, device_id: str, sensor_type: str) -> None:
        """Start the series for ``device_id``/``sensor_type`` under ``seed``."""
        self._rng = random.Random(f"{seed}:{device_id}:{sensor_type}")
        self._value = self._rng.uniform(20.0, 80.0)

    def next_value(self) -> float:
        """The next value, within [0, 100], rounded to hundredths."""
        self._value = min(VALUE_MAX, max(VALUE_MIN, self._value + self._rng.gauss(0.0, 1.5)))
        return round(self._value, 2)

    def take(self, n: int) -> list[float]:
        """The next ``n`` values."""
        return [self.next_value() for _ in range(n)]


@dataclass(frozen=True, slots=True)
class ClassicReading:
    """One reading of the classic data set."""

    device_id: str
    sensor_type: str
    ts: float
    value: float


def classic_dataset(total: int = 5000, seed: int = 1, devices: Sequence[str] = CLASSIC_DEVICES,
                    sensor_types: Sequence[str] = CLASSIC_SENSOR_TYPES, start: float = CLASSIC_START,
                    end: float = CLASSIC_END) -> list[ClassicReading]:
    """``total`` readings spread over a year, round-robin over devices and sensor types, sorted by ts."""
    rng = random.Random(f"classic:{seed}")
    series = {(d, t): SensorSeries(seed, d, t) for d in devices for t in sensor_types}
    pairs = list(series)
    out = []
    for i in range(total):
        device_id, sensor_type = pairs[i % len(pairs)]
        ts = round(rng.uniform(start, end), 6)
        out.append(ClassicReading(device_id, sensor_type, ts, series[(device_id, sensor_type)].next_value()))
    out.sort(key=lambda r: r.ts)
    return out


def live_timestamps(now: float, n: int, interval: float) -> Iterator[float]:
    """``n`` timestamps ending at ``now``, ``interval`` apart (for a batch of readings taken just now)."""
    for i in range(n):
        yield round(now - (n - 1 - i) * interval, 6)
