"""Loading the TOML file into ProxyConfig, with errors that name the key path and the reason,
and a holder that swaps configurations atomically on reload."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sqlproxy.config.models import ProxyConfig


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    path: str  # dotted key path, e.g. "users.alice.api_key_sha256" or "policies.3.action"
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` lists every key at fault."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def _key_path(loc: tuple[int | str, ...]) -> str:
    # pydantic reports the field name for aliased fields ("schema_"); users wrote "schema".
    parts = ["schema" if p == "schema_" else str(p) for p in loc]
    return ".".join(parts)


def _problems_from(err: ValidationError) -> list[ConfigProblem]:
    out: list[ConfigProblem] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # Model-level validators report at the model; their message carries the subpath itself.
        out.append(ConfigProblem(_key_path(loc), msg))
    return out


def parse_config(data: dict[str, Any], source: str = "<config>") -> ProxyConfig:
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _problems_from(e)) from None


def load_config(path: str | Path) -> ProxyConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), [ConfigProblem("", f"cannot read file: {e.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(p), [ConfigProblem("", "file is not UTF-8")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), [ConfigProblem("", f"TOML syntax error: {e}")]) from None
    return parse_config(data, str(p))


# What a listener returns: None, or a function that puts what it built in place.
Commit = Callable[[], None]
Listener = Callable[[ProxyConfig, ProxyConfig], Commit | None]


class ConfigHolder:
    """The running configuration. ``current`` is one attribute read, so a request sees either
    the old or the new config, never a mix. A reload that fails leaves the old one in place."""

    def __init__(self, config: ProxyConfig, path: Path | None = None) -> None:
        self._config = config
        self._path = path
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.generation = 1

    @property
    def current(self) -> ProxyConfig:
        return self._config

    @property
    def path(self) -> Path | None:
        return self._path

    def on_change(self, listener: Listener) -> None:
        """``listener(old, new)`` runs on every replace, before the swap. It builds what it
        derives from ``new`` and raises (ConfigError) when it cannot, changing nothing; it
        returns a function that puts what it built in place (and does not fail), run only
        once every listener has succeeded, or None when it has nothing to put in place."""
        self._listeners.append(listener)

    def reload(self) -> ProxyConfig:
        """Re-read the file. Raises ConfigError (and keeps the old config) when it is invalid."""
        if self._path is None:
            raise ConfigError("<none>", [ConfigProblem("", "the proxy was started without a config file")])
        new = load_config(self._path)
        return self.replace(new)

    def replace(self, new: ProxyConfig) -> ProxyConfig:
        with self._lock:
            old = self._config
            # Listeners build derived state (policy engine, user index, TLS context); if one
            # fails the swap is abandoned before any of it is put in place, so that config and
            # derived state never disagree.
            commits = [c for listener in self._listeners if (c := listener(old, new)) is not None]
            for commit in commits:
                commit()
            self._config = new
            self.generation += 1
            return new
