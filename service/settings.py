"""Settings written once: a config dataclass field carries its default, help text and range,
and the command line, the environment variables and the range checks are derived from it.

    @dataclass(frozen=True)
    class SchedulerConfig:
        max_wait_ms: float = setting(5.0, "how long an idle server waits", 0, 10_000)

A field made with ``setting(..., help)`` is a ``serve`` flag (``--max-wait-ms``) and an
environment variable (``NMTSERVE_MAX_WAIT_MS``); one without help text is an internal setting
that tests and benchmarks may set but users do not (it follows from the provider and bundle).
"""

from __future__ import annotations

from dataclasses import Field, field, fields
from typing import Any

ENV_PREFIX = "NMTSERVE_"
INT32 = 2**31 - 1  # gRPC's and onnxruntime's integer settings are 32-bit


def setting(
    default: Any,
    help: str = "",
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    """A dataclass field with what its flag needs. secret: the environment value is never
    shown as the flag's default in --help."""
    meta = {"help": help, "range": (lo, hi), "choices": choices, "secret": secret}
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flags_of(config: type) -> list[Field[Any]]:
    """The fields of a config class that are user settings (flags and environment)."""
    return [f for f in fields(config) if f.metadata.get("help")]


def problems(config: Any) -> list[str]:
    """Each field outside its range or choices, named by its flag (an internal setting by its
    field name); NaN and infinity are outside every range."""
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        name = flag(f.name) if f.metadata.get("help") else f.name
        lo, hi = f.metadata.get("range", (None, None))
        choices = f.metadata.get("choices", ())
        if choices and value not in choices:
            out.append(f"{name} {value!r}: must be one of {', '.join(choices)}")
        elif lo is not None and hi is not None and not lo <= value <= hi:  # False for NaN
            out.append(f"{name} {value!r}: must be from {lo} to {hi}")
    return out


def check(config: Any, *extra: str) -> None:
    """Raises ValueError listing every out-of-range field and the extra problems given."""
    found = problems(config) + [p for p in extra if p]
    if found:
        raise ValueError("; ".join(found))
