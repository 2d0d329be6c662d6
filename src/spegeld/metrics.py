"""Prometheus metrics without prometheus_client and without process-global state.

The app creates one :class:`MetricsRegistry` and passes it to the components that count
things; ``/metrics`` serves ``registry.render()`` with :data:`CONTENT_TYPE`.

    registry = MetricsRegistry()
    requests = registry.counter("spegel_mirror_requests_total", "Mirror requests.",
                                ("registry", "cache", "source"))
    requests.labels(registry="docker.io", cache="hit", source="internal").inc()

Exposition is text format 0.0.4: metrics in registration order, children sorted by
label values, and numbers formatted the way Spegel's Go client formats them
(``0``, ``0.25``, ``+Inf``), including the histogram ``le`` label.

Nothing here locks: trio runs every task on one thread. Don't update metrics from
``trio.to_thread`` workers.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import ClassVar, Generic, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "MetricsRegistry",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The Go and Python clients' defaults: request latencies in seconds, 5 ms to 10 s.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL_VALUE_ESCAPES = str.maketrans({"\\": r"\\", '"': r"\"", "\n": r"\n"})
_HELP_ESCAPES = str.maketrans({"\\": r"\\", "\n": r"\n"})
# Below this, every integral float is exact and prints shorter as an int ("3", not "3.0").
_EXACT_INT_LIMIT = 2.0**53


def _format_value(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INT_LIMIT:
        return str(int(value))
    return repr(value)


class CounterChild:
    """One labelled series of a :class:`Counter`: counted, or read at scrape time."""

    __slots__ = ("_function", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def inc(self, amount: float = 1) -> None:
        # `not >=` also rejects NaN, which would poison the counter for good.
        if not amount >= 0:
            raise ValueError(f"counters only go up; cannot add {amount!r}")
        if self._function is not None:
            raise ValueError("this counter is read by set_function; it cannot be incremented")
        self._value += amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value by calling ``function`` at every scrape: for a total something
        else keeps (the kernel's CPU time of this process), which must never go down."""
        self._function = function

    @property
    def value(self) -> float:
        if self._function is not None:
            return float(self._function())
        return self._value


class GaugeChild:
    """One labelled series of a :class:`Gauge`: set directly or computed at scrape time."""

    __slots__ = ("_function", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set the value, replacing any function given to :meth:`set_function`."""
        self._function = None
        self._value = float(value)

    def inc(self, amount: float = 1) -> None:
        self._check_settable()
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._check_settable()
        self._value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Compute the value by calling ``function`` at every scrape (and every ``value``)."""
        self._function = function

    @property
    def value(self) -> float:
        if self._function is not None:
            return float(self._function())
        return self._value

    def _check_settable(self) -> None:
        if self._function is not None:
            raise ValueError("this gauge is computed by set_function; use set() to replace it")


class HistogramChild:
    """One labelled series of a :class:`Histogram`."""

    __slots__ = ("_counts", "_sum", "_upper_bounds")

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self._upper_bounds = upper_bounds  # ends with +Inf, so every observation has a bucket
        self._counts = [0] * len(upper_bounds)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            raise ValueError("cannot observe NaN")
        # Buckets are "less than or equal": the first bound >= value.
        self._counts[bisect_left(self._upper_bounds, value)] += 1
        self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def buckets(self) -> list[tuple[float, int]]:
        """``(upper bound, cumulative count)`` pairs, the last bound being ``+Inf``."""
        cumulative: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip(self._upper_bounds, self._counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return cumulative


_Child = TypeVar("_Child", CounterChild, GaugeChild, HistogramChild)


class _Metric(Generic[_Child]):
    _type: ClassVar[str]
    _reserved_labels: ClassVar[frozenset[str]] = frozenset()
    _suffixes: ClassVar[tuple[str, ...]] = ("",)

    def __init__(self, name: str, help: str, labelnames: Iterable[str]) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for label in labelnames:
            if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
                raise ValueError(f"invalid label name {label!r} for {name}")
            if label.startswith("__"):
                raise ValueError(f"label names starting with __ are reserved: {label!r}")
            if label in self._reserved_labels:
                raise ValueError(f"{self._type} {name} cannot have a label named {label!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}: {labelnames}")
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self._children: dict[tuple[str, ...], _Child] = {}
        self._label_text: dict[tuple[str, ...], str] = {}
        if not labelnames:
            self._add_child(())

    def sample_names(self) -> tuple[str, ...]:
        """The names this metric's samples use, which no other metric may share."""
        return tuple(self.name + suffix for suffix in self._suffixes)

    def label_values(self) -> list[tuple[str, ...]]:
        """The label values of every series so far, in ``labelnames`` order."""
        return list(self._children)

    def labels(self, **labels: str) -> _Child:
        """The series with these label values, created on first use."""
        if len(labels) == len(self.labelnames):
            try:
                key = tuple([labels[label] for label in self.labelnames])
            except KeyError:
                pass
            else:
                child = self._children.get(key)
                return child if child is not None else self._add_child(key)
        raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")

    def _unlabelled(self) -> _Child:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: call labels() first")
        return self._children[()]

    def _add_child(self, key: tuple[str, ...]) -> _Child:
        for value in key:
            if not isinstance(value, str):
                raise TypeError(f"label values must be str, got {value!r} for {self.name}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"label value {value!r} is not valid UTF-8") from exc
        child = self._new_child()
        self._children[key] = child
        self._label_text[key] = ",".join(
            f'{label}="{value.translate(_LABEL_VALUE_ESCAPES)}"'
            for label, value in zip(self.labelnames, key, strict=True)
        )
        return child

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def _render(self, out: list[str]) -> None:
        if not self._children:
            return
        out.append(f"# HELP {self.name} {self.help.translate(_HELP_ESCAPES)}")
        out.append(f"# TYPE {self.name} {self._type}")
        for key in sorted(self._children):
            self._render_child(out, self._label_text[key], self._children[key])

    def _render_child(self, out: list[str], label_text: str, child: _Child) -> None:
        raise NotImplementedError


def _braced(label_text: str) -> str:
    return f"{{{label_text}}}" if label_text else ""


class Counter(_Metric[CounterChild]):
    """A value that only goes up; Prometheus's ``rate()`` copes with restarts."""

    _type = "counter"

    def inc(self, amount: float = 1) -> None:
        """Increment the counter that has no labels."""
        self._unlabelled().inc(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        self._unlabelled().set_function(function)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _render_child(self, out: list[str], label_text: str, child: CounterChild) -> None:
        out.append(f"{self.name}{_braced(label_text)} {_format_value(child.value)}")


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down, or is computed at scrape time."""

    _type = "gauge"

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._unlabelled().dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        self._unlabelled().set_function(function)

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _render_child(self, out: list[str], label_text: str, child: GaugeChild) -> None:
        out.append(f"{self.name}{_braced(label_text)} {_format_value(child.value)}")


class Histogram(_Metric[HistogramChild]):
    """Observations counted into cumulative ``le`` buckets, plus their sum and count."""

    _type = "histogram"
    _reserved_labels = frozenset({"le"})
    _suffixes = ("_bucket", "_sum", "_count")

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if any(math.isnan(bound) for bound in bounds):
            raise ValueError(f"histogram {name} has a NaN bucket")
        if any(low >= high for low, high in pairwise(bounds)):
            raise ValueError(f"histogram {name} buckets must strictly increase: {list(buckets)}")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._upper_bounds = tuple(bounds)
        self._le_text = tuple(f'le="{_format_value(bound)}"' for bound in bounds)
        super().__init__(name, help, labelnames)

    def observe(self, value: float) -> None:
        """Observe into the histogram that has no labels."""
        self._unlabelled().observe(value)

    @property
    def upper_bounds(self) -> tuple[float, ...]:
        return self._upper_bounds

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._upper_bounds)

    def _render_child(self, out: list[str], label_text: str, child: HistogramChild) -> None:
        prefix = f"{label_text}," if label_text else ""
        for le_text, (_, cumulative) in zip(self._le_text, child.buckets(), strict=True):
            out.append(f"{self.name}_bucket{{{prefix}{le_text}}} {cumulative}")
        out.append(f"{self.name}_sum{_braced(label_text)} {_format_value(child.sum)}")
        out.append(f"{self.name}_count{_braced(label_text)} {child.count}")


_Registered = TypeVar("_Registered", Counter, Gauge, Histogram)


class MetricsRegistry:
    """The metrics one spegeld process exposes; construct one in the app and pass it down."""

    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []
        self._sample_names: set[str] = set()
        self._collectors: list[Callable[[], object]] = []

    def on_scrape(self, collect: Callable[[], object]) -> None:
        """Call ``collect`` at the start of every :meth:`render`: to set series whose
        label values are only known then (the advertised content, per registry)."""
        self._collectors.append(collect)

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._register(Gauge(name, help, labelnames))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return self._register(Histogram(name, help, labelnames, buckets))

    def render(self) -> str:
        """The text exposition (format 0.0.4) of every metric, ending in a newline."""
        for collect in self._collectors:
            collect()
        out: list[str] = []
        for metric in self._metrics:
            metric._render(out)
        return "".join(line + "\n" for line in out)

    def _register(self, metric: _Registered) -> _Registered:
        # A histogram's foo_sum would be indistinguishable from a counter named foo_sum.
        names = {metric.name, *metric.sample_names()}
        clash = names & self._sample_names
        if clash:
            raise ValueError(f"metric {metric.name} clashes with registered name {min(clash)}")
        self._sample_names |= names
        self._metrics.append(metric)
        return metric
