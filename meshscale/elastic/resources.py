"""Where the number of available devices comes from; the elastic trainer polls it.

A `ResourceSource` answers two questions: which devices may training use now
(`poll`), and which device counts a scheduler says are coming next (`announced`, a hint
for compiling ahead). Three sources: `Static` (a fixed list), `FileSource` (a text file a
scheduler or operator rewrites) and `Callback` (any function).

What a source must never do: hand the trainer a device list it cannot use. Bad input
(unparsable text, zero devices, more than exist, unknown or repeated devices, a failing
callback) is logged as a warning and the last good answer is kept, so a typo in a file
never stops or shrinks a running job. Only a source that has never had a good answer raises
`ResourceError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from meshscale.errors import ResourceError

log = logging.getLogger(__name__)

DeviceSpec = int | Sequence[jax.Device]  # a count (first n of the pool) or the devices


class ResourceSource:
    """Base of every source: `poll()` the devices available now."""

    def poll(self) -> list[jax.Device]:
        raise NotImplementedError

    def announced(self) -> list[int]:
        """Device counts a scheduler says are coming next (none unless a source knows)."""
        return []


def _pool(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    return list(jax.devices() if devices is None else devices)


def _first(count: int, pool: list[jax.Device]) -> list[jax.Device]:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"device count must be a positive int, got {count!r}")
    if count > len(pool):
        raise ValueError(f"{count} devices asked for, only {len(pool)} exist")
    return pool[:count]


def _by_ids(ids: Sequence[int], pool: list[jax.Device]) -> list[jax.Device]:
    """The devices with these ids, in pool order (neighbouring devices stay neighbours)."""
    if not ids:
        raise ValueError("empty device id list")
    if len(set(ids)) != len(ids):
        raise ValueError(f"repeated device ids in {list(ids)}")
    known = {int(d.id) for d in pool}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"unknown device ids {unknown} (known: {sorted(known)})")
    wanted = set(ids)
    return [d for d in pool if int(d.id) in wanted]


def _resolve(spec: DeviceSpec, pool: list[jax.Device]) -> list[jax.Device]:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return _first(spec, pool)
    devices = list(spec)
    if not devices:
        raise ValueError("empty device list")
    if not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"expected jax devices or a count, got {spec!r}")
    ids = [int(d.id) for d in devices]
    repeated = next((d for d in devices if ids.count(int(d.id)) > 1), None)
    if repeated is not None:
        raise ValueError(f"device {repeated} appears {ids.count(int(repeated.id))} times "
                         f"in device ids {ids}")
    return devices


def _name(fn: Callable) -> str:
    """A function's name for a message (its repr when it has none)."""
    name = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', None) or '?'}.{name}" if name else repr(fn)


class Static(ResourceSource):
    """Always the same devices: a list, or a count meaning the first n of `jax.devices()`."""

    def __init__(self, devices: DeviceSpec):
        try:
            self._devices = _resolve(devices, _pool(None))
        except ValueError as e:
            raise ResourceError(f"Static resources: {e}: pass a count 1..{len(jax.devices())} "
                                "or distinct devices") from e

    def poll(self) -> list[jax.Device]:
        return list(self._devices)


def _parse_devices(value: object, pool: list[jax.Device]) -> list[jax.Device]:
    if isinstance(value, int) and not isinstance(value, bool):
        return _first(value, pool)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in value):
        return _by_ids(value, pool)
    raise ValueError(f"'devices' must be a count or a list of ids, got {value!r}")


def _parse_counts(value: object) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"'next' must be a list of positive counts, got {value!r}")
    return list(value)


def parse_file_text(text: str, pool: list[jax.Device]) -> tuple[list[jax.Device], list[int]]:
    """Read a resource file: ``6`` (a count), ``0,1,2,5`` / ``0 1 2 5`` (ids; a single id
    needs a trailing comma, ``5,``), or ``{"devices": 6 or [ids], "next": [8]}``.

    Returns (devices, announced counts); raises ValueError on anything else.
    """
    text = text.strip()
    if text.startswith("{"):
        obj = json.loads(text)
        if not isinstance(obj, dict) or "devices" not in obj:
            raise ValueError("JSON resource file needs a 'devices' key")
        extra = sorted(set(obj) - {"devices", "next"})
        if extra:
            raise ValueError(f"unknown keys {extra} (known: devices, next)")
        return _parse_devices(obj["devices"], pool), _parse_counts(obj.get("next", []))
    if re.fullmatch(r"\d+", text):
        return _first(int(text), pool), []
    if re.fullmatch(r"\d+([\s,]+\d+)*[\s,]*", text) and ("," in text or " " in text):
        return _by_ids([int(t) for t in re.split(r"[\s,]+", text) if t], pool), []
    raise ValueError(f"cannot parse {text[:60]!r}: write a count, device ids, or JSON")


class FileSource(ResourceSource):
    """Devices named in a text file that a scheduler or an operator rewrites.

    The file is re-read at every `poll`. Content: see `parse_file_text`; write it with
    `FileSource.write`, which replaces the file atomically so a poll never sees half a
    write. Bad content, or a file gone missing, keeps the last good value (one warning
    per distinct problem).

    Args:
      path: the file.
      devices: the pool that counts and ids refer to (default `jax.devices()`).
      default: a count used while the file is missing or bad before any good read;
        without it, such a file at construction raises `ResourceError`.
    """

    def __init__(self, path: str | os.PathLike, *, devices: Sequence[jax.Device] | None = None,
                 default: int | None = None):
        self.path = Path(path)
        self._pool = _pool(devices)
        self._warned: str | None = None
        self._next: list[int] = []
        try:
            self._devices, self._next = parse_file_text(self.path.read_text(), self._pool)
        except (OSError, ValueError) as e:
            if default is None:
                raise ResourceError(
                    f"resource file {self.path}: {e}: write a device count into it "
                    f"(FileSource.write({str(self.path)!r}, {len(self._pool)})) or pass "
                    "default=") from e
            try:
                self._devices = _first(default, self._pool)
            except ValueError as bad:
                raise ResourceError(f"FileSource default: {bad}") from bad
            self._warn(f"resource file {self.path}: {e}; using default={default} devices")

    def _warn(self, message: str) -> None:
        if message != self._warned:
            log.warning(message)
            self._warned = message

    def poll(self) -> list[jax.Device]:
        try:
            self._devices, self._next = parse_file_text(self.path.read_text(), self._pool)
            self._warned = None
        except (OSError, ValueError) as e:
            self._warn(f"resource file {self.path}: {e}; keeping the last good value "
                       f"({len(self._devices)} devices)")
        return list(self._devices)

    def announced(self) -> list[int]:
        return list(self._next)

    @staticmethod
    def write(path: str | os.PathLike, devices: int | Sequence[int], *,
              announced: Sequence[int] = ()) -> None:
        """Write a count or device ids (and announced counts) to `path` atomically."""
        if announced:
            text = json.dumps({"devices": devices if isinstance(devices, int) else
                               list(devices), "next": list(announced)})
        elif isinstance(devices, int):
            text = str(devices)
        else:
            text = ",".join(str(int(i)) for i in devices) + ("," if len(devices) == 1 else "")
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Callback(ResourceSource):
    """Devices from a function: it returns jax devices, or a count (first n of the pool).

    A call that raises or returns something unusable keeps the last good value, with a
    warning; the first call must succeed (it runs at construction).

    Args:
      fn: the function polled.
      announced: optional function returning the device counts coming next.
      devices: the pool a count refers to (default `jax.devices()`).
    """

    def __init__(self, fn: Callable[[], DeviceSpec], *,
                 announced: Callable[[], Sequence[int]] | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self._fn = fn
        self._announced = announced
        self._pool = _pool(devices)
        try:
            answer = fn()
        except Exception as e:
            raise ResourceError(f"resource callback {_name(fn)} failed on its first call: "
                                f"{e}: return distinct jax devices or a positive count") from e
        try:
            self._devices = _resolve(answer, self._pool)
        except ValueError as e:
            raise ResourceError(f"resource callback {_name(fn)} gave an unusable answer on "
                                f"its first call: {e}: return distinct jax devices or a "
                                "positive count") from e

    def poll(self) -> list[jax.Device]:
        try:
            self._devices = _resolve(self._fn(), self._pool)
        except Exception as e:
            log.warning("resource callback %s: %s; keeping the last good value (%d devices)",
                        _name(self._fn), e, len(self._devices))
        return list(self._devices)

    def announced(self) -> list[int]:
        if self._announced is None:
            return []
        try:
            return _parse_counts(list(self._announced()))
        except Exception as e:
            log.warning("resource announced-callback %r: %s; announcing nothing",
                        self._announced, e)
            return []
