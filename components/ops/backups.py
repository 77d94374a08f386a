"""``python -m components backup PATH`` and ``restore PATH``: consistent copies of a live SQLite store.

A backup is refused into a path that exists unless ``--force`` is given. A restore first checks that the copy
opens with the configured keys (every data key its records are sealed with, and the index key), and replaces
the store only then; with a key missing it says which, and changes nothing. DynamoDB has its own means
(point-in-time recovery, export to S3): see docs/operations.md.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from components.core.errors import ConfigError
from components.core.keycheck import key_problems
from components.core.sealing import load_keyring
from components.core.settings import Settings, env_var
from components.storage import sqlite_backup

Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


def _sqlite_only(settings: Settings, command: str) -> None:
    if settings.storage.backend != "sqlite":
        raise ConfigError(f"{command} copies a SQLite store, and storage.backend is {settings.storage.backend}: "
                          "for DynamoDB use point-in-time recovery or an export to S3 (docs/operations.md, Backups)")


def backup(settings: Settings, path: str, force: bool = False, say: Say = _say) -> int:
    """Copy the store (storage may be writing to it) into ``path``; exit code."""
    _sqlite_only(settings, "backup")
    target = os.path.abspath(path)
    if os.path.exists(target) and not force:
        raise ConfigError(f"backup: {target} exists; choose another path or pass --force to replace it")
    if target == os.path.abspath(settings.storage.sqlite_path):
        raise ConfigError(f"backup: {target} is the store itself ({env_var('storage.sqlite_path')})")
    started = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            say(f"backup: {done}/{total} pages ({100 * done // max(total, 1)}%)")

    pages = sqlite_backup.backup(settings.storage.sqlite_path, target, progress)
    say(f"backup: {settings.storage.sqlite_path} copied to {target} ({pages} pages, "
        f"{Path(target).stat().st_size} bytes) in {time.monotonic() - started:.1f}s; keep it with the keys "
        "(the data keys and the index key): without them it cannot be read")
    return 0


def restore(settings: Settings, path: str, say: Say = _say) -> int:
    """Check that ``path`` opens with the configured keys, then make it the store; exit code."""
    _sqlite_only(settings, "restore")
    copy = os.path.abspath(path)
    ring = load_keyring(settings.keys, os.environ)
    samples = sqlite_backup.key_samples(copy)
    problems = key_problems(ring, samples.records, samples.counts, samples.device_rows)
    if problems:
        for line in problems:
            print(f"restore: {line}", file=sys.stderr, flush=True)
        print(f"restore refused: {copy} does not open with the configured keys (keys.source="
              f"{settings.keys.source}); {settings.storage.sqlite_path} is unchanged", file=sys.stderr, flush=True)
        return 1
    say(f"restore: {copy} opens with the configured keys ({len(samples.records)} data key(s)"
        f"{', the index key' if samples.device_rows else ''}); replacing {settings.storage.sqlite_path} ...")
    pages = sqlite_backup.restore(copy, settings.storage.sqlite_path)
    say(f"restore: {settings.storage.sqlite_path} is now the copy ({pages} pages)")
    return 0
