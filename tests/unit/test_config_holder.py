"""ConfigHolder.replace: every listener builds first, then what they built is put in place and
the configuration swapped; a listener that fails leaves everything as it was."""

from __future__ import annotations

import pytest

from sqlproxy.config.loader import Commit, ConfigError, ConfigHolder, ConfigProblem, parse_config
from sqlproxy.config.models import ProxyConfig


def test_a_failing_listener_keeps_the_others_from_putting_anything_in_place() -> None:
    old, new = parse_config({}), parse_config({"embedded": "off"})
    holder = ConfigHolder(old)
    done: list[str] = []
    refuse = True

    def first(o: ProxyConfig, n: ProxyConfig) -> Commit:
        assert (o, n) == (old, new)
        return lambda: done.append("first")

    def plain(o: ProxyConfig, n: ProxyConfig) -> None:
        done.append("plain ran")  # nothing to put in place: returns None

    def last(o: ProxyConfig, n: ProxyConfig) -> Commit:
        if refuse:
            raise ConfigError("<config>", [ConfigProblem("wire.tls_key", "cannot load")])
        return lambda: done.append(f"last sees {holder.current.embedded}")

    for listener in (first, plain, last):
        holder.on_change(listener)
    with pytest.raises(ConfigError, match=r"wire\.tls_key"):
        holder.replace(new)
    assert done == ["plain ran"]
    assert holder.current is old and holder.generation == 1
    refuse = False
    done.clear()
    assert holder.replace(new) is new
    # Commits run in order, after every listener has built, before the swap.
    assert done == ["plain ran", "first", "last sees demo"]
    assert holder.current is new and holder.generation == 2
