"""Plugins (SPEC §9): plain classes whose method names are the hooks; one manager dispatches.

    load_plugins(entries) -> Plugins            or PluginError(.problems) naming every bad entry
    await plugins.start() ... await plugins.close()
    plugins.on_access(record)                   sinks: queued per plugin and return at once,
    plugins.on_event(record)                    never awaited on the request path
    plugins.on_alert(alert)
    plugins.on_records(lines)                   the durable audit lines, checkpoints included
    await plugins.check(facts) -> Deny | None   the extra policy check: it can only deny
    plugins.stats() -> {name: PluginStats}

A plugin is a class built from its options (the keys beside `use:`, a dict; secret-named
ones are SecretStr) that validates them in its constructor and raises PluginError (or
ValueError) with a clear message; `Options` reads them with uniform messages. A constructor
does no network I/O, so `gateway check-config` can build every plugin; it may read the files
its options name, so on a running server `load_plugins` runs in a thread, like
`load_settings`. Optional `start()` and `close()`, sync or async.

Isolation. Each plugin has its own bounded queue (QUEUE_SIZE records) and one consumer task
calling its sink hooks one at a time, each call under HOOK_TIMEOUT. A hook that raises or
hangs loses that record (or batch) for that plugin only; a full queue drops new records.
Both are counted, and logged at most once per LOG_EVERY seconds per plugin. A sync hook runs
on the event loop: it must not block (do I/O in an async hook). `check` runs on the request
path under CHECK_TIMEOUT, plugins in config order, the first Deny winning; a check that
raises, times out or returns anything but Deny or None denies (fail closed).

    PluginError(ValueError)   a plugin cannot be loaded, its options are wrong, or it cannot start
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import pkgutil
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from gateway.configfile import Problem, yaml_kind

if TYPE_CHECKING:
    from gateway.settings import Plugin

__all__ = [
    "HOOKS",
    "Deny",
    "Options",
    "PluginError",
    "PluginStats",
    "Plugins",
    "load_plugins",
]

SINK_HOOKS = ("on_access", "on_event", "on_alert", "on_records")
HOOKS = (*SINK_HOOKS, "check")
ENTRY_POINT_GROUP = "gateway.plugins"
SHIPPED = "plugins"  # the package of the plugins shipped with the gateway: `use: redis_stream`

QUEUE_SIZE = 10_000  # records waiting per plugin; beyond it new ones are dropped and counted
HOOK_TIMEOUT = 5.0  # one sink call; also how long close() lets the queues drain
CHECK_TIMEOUT = 2.0  # one policy check, on the request path
LOG_EVERY = 60.0  # a failing plugin is logged at most once per this many seconds
BATCH = 1_000  # on_records: queued batches are merged into calls of up to this many lines

_log = logging.getLogger("gateway.plugins")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_USE = re.compile(rf"[A-Za-z_][A-Za-z0-9_-]*|{_NAME}(?:\.{_NAME})*(?::{_NAME})?")
_NOT_REASON = re.compile(r"[^A-Za-z0-9._-]")


class PluginError(ValueError):
    """`problems` (from load_plugins) place each message at its `plugins[i]` entry."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Deny:
    """What a `check` hook returns to deny; `reason` is a short code (letters, digits, . _ -)."""

    reason: str


@dataclass(frozen=True, slots=True)
class PluginStats:
    delivered: int  # records a sink hook took, and checks answered
    dropped: int  # records refused by a full queue, or still queued at close
    failed: int  # records lost to a hook that raised or timed out, and failed checks
    queued: int  # records waiting now


# -- options -----------------------------------------------------------------------------------

_REQUIRED: Any = object()


class Options:
    """A plugin's options read one by one, with uniform messages; `done()` refuses the rest."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._options = dict(options)
        self._known: list[str] = []

    def _get(self, key: str) -> Any:
        if key not in self._known:
            self._known.append(key)
        return self._options.get(key)

    def text(self, key: str, default: str = _REQUIRED) -> str:
        value = self._get(key)
        if value is None and default is _REQUIRED:
            raise PluginError(f"{key} is required")
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise PluginError(f"{key} must be a non-empty string, not {yaml_kind(value)}")
        return value

    def optional(self, key: str) -> str | None:
        return None if self._get(key) is None else self.text(key)

    def integer(self, key: str, default: int, *, maximum: int | None = None) -> int:
        value = self._get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # `${NAME}` from the environment is a string
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PluginError(f"{key} must be a positive integer")
        if maximum is not None and value > maximum:
            raise PluginError(f"{key} must be at most {maximum}")
        return value

    def path(self, key: str) -> Path | None:
        value = self._get(key)
        if value is None or isinstance(value, Path):
            return value
        if isinstance(value, str) and value:
            return Path(value)
        raise PluginError(f"{key} must be a file path, not {yaml_kind(value)}")

    def secret(self, key: str) -> SecretStr | None:
        value = self._get(key)
        if value is None or isinstance(value, SecretStr):
            return value
        if isinstance(value, str):
            return SecretStr(value)
        raise PluginError(f"{key} must be a string, not {yaml_kind(value)}")

    def done(self) -> None:
        """Refuse any option no reader asked for (a typo would otherwise be ignored)."""
        for key in self._options:
            if key not in self._known:
                close = difflib.get_close_matches(key, self._known, n=1, cutoff=0.7)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise PluginError(
                    f"unknown option {key!r} ({hint}options: {', '.join(sorted(self._known))})"
                )


# -- loading -----------------------------------------------------------------------------------


def load_plugins(
    entries: Sequence[Plugin],
    *,
    queue_size: int = QUEUE_SIZE,
    hook_timeout: float = HOOK_TIMEOUT,
    check_timeout: float = CHECK_TIMEOUT,
) -> Plugins:
    """Find and build every plugin of `plugins:`; PluginError lists every entry that failed."""
    workers: list[_Worker] = []
    problems: list[Problem] = []
    for i, entry in enumerate(entries):
        try:
            cls = _resolve(entry.use)
        except PluginError as err:
            problems.append(Problem(f"plugins[{i}].use: {err}", (("plugins", i, "use"),)))
            continue
        try:
            plugin = _build(cls, entry.options)
        except PluginError as err:
            problems.append(Problem(f"plugins[{i}] ({entry.use}): {err}", (("plugins", i),)))
            continue
        name = _name(plugin, entry.use, i, [worker.name for worker in workers])
        workers.append(_Worker(name, plugin, queue_size, hook_timeout))
    if problems:
        raise PluginError("\n".join(problem.message for problem in problems), problems)
    return Plugins(workers, check_timeout=check_timeout)


def _resolve(use: str) -> type:
    """`redis_stream` (shipped), an entry point name, `pkg.module:Class` or `pkg.module.Class`."""
    if not _USE.fullmatch(use):
        raise PluginError(f"{use!r} is not a plugin name, a dotted path or an entry point")
    module_name, colon, attr = use.partition(":")
    if colon:
        return _plugin_class(getattr(_import(module_name), attr, None), use)
    if "." not in use and _is_shipped(use):
        return _plugin_class(_import(f"{SHIPPED}.{use}"), use)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=use):
        try:
            return _plugin_class(entry_point.load(), use)
        except Exception as err:
            raise PluginError(f"entry point {use!r} failed to load: {_describe(err)}") from err
    if "." in use:
        module_name, _, attr = use.rpartition(".")
        return _plugin_class(getattr(_import(module_name), attr, None), use)
    shipped = ", ".join(_shipped_names()) or "none"
    raise PluginError(
        f"unknown plugin {use!r}: not shipped in plugins/ ({shipped}), "
        f"and no entry point of group {ENTRY_POINT_GROUP} has this name"
    )


def _is_shipped(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{SHIPPED}.{name}") is not None
    except ImportError:
        return False


def _shipped_names() -> list[str]:
    try:
        package = importlib.import_module(SHIPPED)
    except ImportError:
        return []
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__))


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as err:  # a plugin module's own import errors are reported, not raised
        raise PluginError(f"cannot import {module_name}: {_describe(err)}") from err


def _plugin_class(found: object, use: str) -> type:
    if isinstance(found, ModuleType):
        found = getattr(found, "Plugin", None)  # a module names its class `Plugin`
    if not inspect.isclass(found):
        raise PluginError(f"{use!r} does not name a plugin class")
    return found


def _build(cls: type, options: Mapping[str, Any]) -> object:
    try:
        plugin: object = cls(dict(options))
    except ValueError as err:  # PluginError, or a plain ValueError from the plugin
        raise PluginError(str(err)) from err
    except Exception as err:
        raise PluginError(f"cannot be set up: {_describe(err)}") from err
    typos = [n for n in dir(plugin) if n.startswith("on_") and n not in SINK_HOOKS]
    if typos:
        raise PluginError(f"{typos[0]} is not a hook (hooks: {', '.join(HOOKS)})")
    if not any(callable(getattr(plugin, hook, None)) for hook in HOOKS):
        raise PluginError(f"has no hook method ({', '.join(HOOKS)})")
    return plugin


def _name(plugin: object, use: str, i: int, taken: list[str]) -> str:
    """The plugin's `name` attribute, else `use`; `#i` when an earlier entry has it."""
    name = getattr(plugin, "name", None)
    name = name if isinstance(name, str) and name else use
    return name if name not in taken else f"{name}#{i}"


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- one plugin: its queue, its consumer, its counters -----------------------------------------


class _Worker:
    def __init__(self, name: str, plugin: object, queue_size: int, timeout: float) -> None:
        self.name = name
        self.plugin = plugin
        self.hooks: dict[str, Callable[[Any], Any]] = {
            hook: getattr(plugin, hook) for hook in HOOKS if callable(getattr(plugin, hook, None))
        }
        self.limit = queue_size
        self.timeout = timeout
        self.queue: deque[tuple[str, Any, int]] = deque()  # (hook, payload, records)
        self.pending = self.delivered = self.dropped = self.failed = 0
        self.open = True
        self.started = False
        self.task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._logged_at = -LOG_EVERY
        self._unlogged = 0

    def put(self, hook: str, payload: Any, count: int) -> None:
        if not self.open:
            self.dropped += count
        elif self.pending + count > self.limit:
            self.dropped += count
            self._report("plugin.dropped", hook, f"queue full ({self.limit} records)")
        else:
            self.queue.append((hook, payload, count))
            self.pending += count
            self._wakeup.set()

    async def start(self) -> None:
        await _call(self.plugin, "start", self.timeout)
        self.started = True
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._consume(), name=f"plugin {self.name}")

    def stop_taking(self) -> None:
        self.open = False
        self._wakeup.set()

    async def stop(self) -> None:
        """After the drain: cancel the consumer, count what is left, close the plugin."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.dropped += self.pending
        self.queue.clear()
        self.pending = 0
        if self.started:
            self.started = False
            try:
                await _call(self.plugin, "close", self.timeout)
            except Exception as err:
                _log.warning(
                    "plugin.close_failed",
                    extra={"event": "plugin.close_failed", "plugin": self.name, "error": str(err)},
                )

    async def _consume(self) -> None:
        while self.queue or self.open:
            if not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            hook, payload, count = self._take()
            await self._deliver(hook, payload, count)

    def _take(self) -> tuple[str, Any, int]:
        hook, payload, count = self.queue.popleft()
        if hook != "on_records":
            return hook, payload, count
        lines = list(payload)  # merge the batches queued behind it: fewer round trips
        while self.queue and self.queue[0][0] == hook and len(lines) + self.queue[0][2] <= BATCH:
            lines.extend(self.queue.popleft()[1])
        return hook, tuple(lines), len(lines)

    async def _deliver(self, hook: str, payload: Any, count: int) -> None:
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                result = self.hooks[hook](payload)
                if inspect.isawaitable(result):
                    await result
        except asyncio.CancelledError:
            self.dropped += count  # close() stopped waiting for it
            raise
        except Exception as err:
            self.failed += count
            self._report("plugin.failed", hook, self._why(err, deadline.expired()))
        else:
            self.delivered += count
        finally:
            self.pending -= count

    async def check(self, facts: object, seconds: float) -> Deny | None:
        try:
            async with asyncio.timeout(seconds) as deadline:
                result = self.hooks["check"](facts)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as err:
            self.failed += 1
            self._report("plugin.failed", "check", self._why(err, deadline.expired(), seconds))
            return Deny(f"policy-check-failed:{self.name}")  # SECURITY: fail closed
        if deadline.expired():  # SECURITY: a check that swallowed its cancellation is no answer
            self.failed += 1
            self._report("plugin.failed", "check", f"timed out after {seconds:g}s")
            return Deny(f"policy-check-failed:{self.name}")
        if result is None:
            self.delivered += 1
            return None
        if isinstance(result, Deny):
            self.delivered += 1
            return Deny(f"denied-by-plugin:{self.name}:{_reason(result.reason)}")
        self.failed += 1
        problem = f"returned {type(result).__name__}, not Deny or None"
        self._report("plugin.failed", "check", problem)
        return Deny(f"policy-check-failed:{self.name}")  # SECURITY: a malformed answer denies

    def _why(self, err: Exception, expired: bool, seconds: float | None = None) -> str:
        return f"timed out after {seconds or self.timeout:g}s" if expired else _describe(err)

    def _report(self, event: str, hook: str, problem: str) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY:
            self._unlogged += 1
            return
        fields: dict[str, object] = {"event": event, "plugin": self.name, "hook": hook}
        fields["error"] = problem
        counts = {"failed": self.failed, "dropped": self.dropped, "not_logged": self._unlogged}
        _log.warning(event, extra=fields | counts)
        self._logged_at, self._unlogged = now, 0

    def stats(self) -> PluginStats:
        return PluginStats(self.delivered, self.dropped, self.failed, self.pending)


async def _call(plugin: object, method: str, seconds: float) -> None:
    function = getattr(plugin, method, None)
    if callable(function):
        async with asyncio.timeout(seconds):
            result = function()
            if inspect.isawaitable(result):
                await result


def _reason(reason: object) -> str:
    # SECURITY: a plugin's reason lands in the audit log and the deny page: keep it a short code.
    return _NOT_REASON.sub("-", str(reason))[:64] or "-"


def _bare(line: bytes) -> bytes:
    """A record's exact bytes: what `record.digest` hashes, without the line's newline."""
    return line[:-1] if line.endswith(b"\n") else line


# -- the manager -------------------------------------------------------------------------------


class Plugins:
    """The loaded plugins, in config order. Hooks are called from the event loop's thread."""

    def __init__(
        self, workers: Sequence[_Worker] = (), *, check_timeout: float = CHECK_TIMEOUT
    ) -> None:
        self._workers = tuple(workers)
        self._by_hook = {h: tuple(w for w in self._workers if h in w.hooks) for h in HOOKS}
        self._check_timeout = check_timeout

    def __len__(self) -> int:
        return len(self._workers)

    def __getitem__(self, name: str) -> object:
        """The plugin instance of this name (KeyError if none)."""
        for worker in self._workers:
            if worker.name == name:
                return worker.plugin
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(worker.name for worker in self._workers)

    async def start(self) -> None:
        """Each plugin's start(), then its consumer; PluginError (all stopped) if one fails."""
        for worker in self._workers:
            try:
                await worker.start()
            except Exception as err:
                await self.close(drain=0)
                raise PluginError(f"plugin {worker.name}: start failed: {_describe(err)}") from err

    async def close(self, drain: float = HOOK_TIMEOUT) -> None:
        """Stop taking records, let the queues drain up to `drain` seconds, close each plugin."""
        for worker in self._workers:
            worker.stop_taking()
        tasks = [w.task for w in self._workers if w.task is not None and not w.task.done()]
        if tasks and drain > 0:
            await asyncio.wait(tasks, timeout=drain)
        await asyncio.gather(*(worker.stop() for worker in self._workers))

    def on_access(self, record: Mapping[str, Any]) -> None:
        for worker in self._by_hook["on_access"]:
            worker.put("on_access", dict(record), 1)  # a copy each: as it was when dispatched

    def on_event(self, record: Mapping[str, Any]) -> None:
        for worker in self._by_hook["on_event"]:
            worker.put("on_event", dict(record), 1)

    def on_alert(self, alert: Mapping[str, Any]) -> None:
        for worker in self._by_hook["on_alert"]:
            worker.put("on_alert", dict(alert), 1)

    def on_records(self, lines: Sequence[bytes]) -> None:
        workers = self._by_hook["on_records"]
        if workers and lines:
            batch = tuple(_bare(line) for line in lines)
            for worker in workers:
                worker.put("on_records", batch, len(batch))

    @property
    def checks(self) -> bool:
        """Whether any plugin has a `check` hook (else the request path skips the call)."""
        return bool(self._by_hook["check"])

    async def check(self, facts: object) -> Deny | None:
        """None, or the first plugin's Deny (reason `denied-by-plugin:<name>:<reason>`)."""
        for worker in self._by_hook["check"]:
            deny = await worker.check(facts, self._check_timeout)
            if deny is not None:
                return deny
        return None

    def stats(self) -> dict[str, PluginStats]:
        return {worker.name: worker.stats() for worker in self._workers}
