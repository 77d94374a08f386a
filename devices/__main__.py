"""Command line of the device side: ``python -m devices --help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import txaio
from twisted.internet import defer, task

from components.core.errors import ConfigError
from components.core.settings import Settings, load_settings, simulated_ids
from devices.fleet import SimulationPlan, connect_devices, simulate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devices",
        description="Simulated devices of the classic data model (ids 0 to 50, humidity and temperature, "
                    "values 0.0 to 100.0) publishing to iot.sensor.<device_id>.<sensor_type>. "
                    "Defaults come from the simulator and device sections of config.json.")
    parser.add_argument("--config", help="config file (default: $IOT_CONFIG or ./config.json)")
    sub = parser.add_subparsers(dest="command")

    sim = sub.add_parser("simulate", help="run simulated devices (the default command)")
    sim.add_argument("--devices", type=int, help="number of devices (simulator.devices)")
    sim.add_argument("--first-device", type=int, help="id of the first device (simulator.first_device)")
    sim.add_argument("--device-ids", help="comma-separated device ids, instead of --devices/--first-device")
    sim.add_argument("--sensor-types", help="comma-separated sensor types (simulator.sensor_types)")
    sim.add_argument("--rate", type=float, help="readings per second per device and sensor type (simulator.rate)")
    sim.add_argument("--count", type=int,
                     help="readings per device and sensor type, then stop once storage has acknowledged them all; "
                          "0 runs until Ctrl-C (simulator.count); with --classic, the total number of readings")
    sim.add_argument("--seed", type=int, help="seed of the values; the same seed gives the same values")
    sim.add_argument("--batch", type=int, help="readings per published event (simulator.batch)")
    sim.add_argument("--classic", action="store_true",
                     help="publish the classic data set instead: readings spread over 2017-07-04 to 2018-07-04, "
                          "as fast as flow control allows")
    sim.add_argument("--serializer", choices=("msgpack", "json", "cbor"), help="override router.serializer")

    send = sub.add_parser("send", help="publish one reading as one device and exit (no seq, no spool: at most once)")
    send.add_argument("--device", required=True, help="device id (must be provisioned)")
    send.add_argument("--sensor-type", required=True, help="sensor type, e.g. humidity")
    send.add_argument("--value", required=True, type=float, help="the reading's value")
    send.add_argument("--ts", type=float, help="reading time, epoch seconds (default: now)")
    send.add_argument("--data", help="freeform JSON object stored encrypted with the reading")
    return parser


def _plan(settings: Settings, args: argparse.Namespace) -> SimulationPlan:
    sim = settings.simulator
    if args.device_ids:
        ids = [d.strip() for d in args.device_ids.split(",") if d.strip()]
    else:
        count = args.devices if args.devices is not None else sim.devices
        first = args.first_device if args.first_device is not None else sim.first_device
        ids = simulated_ids(count, first)
    types = args.sensor_types.split(",") if args.sensor_types else list(sim.sensor_types)
    rate = args.rate if args.rate is not None else sim.rate
    if rate <= 0:
        raise ConfigError(f"--rate: got {rate}, expected a positive number")
    return SimulationPlan(
        device_ids=ids, sensor_types=types, rate=rate,
        count=args.count if args.count is not None else sim.count,
        seed=args.seed if args.seed is not None else sim.seed,
        batch=max(1, args.batch if args.batch is not None else sim.batch),
        classic=args.classic, serializer=args.serializer)


@defer.inlineCallbacks
def _send_one(reactor: Any, settings: Settings, args: argparse.Namespace) -> Any:
    (pub,) = connect_devices(settings, [args.device], spooled=False)
    pub.component.start(reactor)
    reading: dict[str, Any] = {"value": args.value, "ts": args.ts if args.ts is not None else time.time()}
    if args.data:
        reading["data"] = json.loads(args.data)
    ok = yield pub.publish_once(args.sensor_type, reading)
    yield pub.component.stop()
    if not ok:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args([*argv, "simulate"])
    try:
        settings = load_settings(args.config)
        plan = _plan(settings, args) if args.command == "simulate" else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    txaio.use_twisted()
    txaio.start_logging(level=settings.log_level)
    if plan is not None:
        task.react(lambda reactor: simulate(reactor, settings, plan))
    else:
        task.react(lambda reactor: _send_one(reactor, settings, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
