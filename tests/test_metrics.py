"""The dependency-free Prometheus registry: exposition text, escaping, validation, buckets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spegeld.metrics import (
    CONTENT_TYPE,
    DEFAULT_BUCKETS,
    Histogram,
    MetricsRegistry,
)

# prometheus_client is not a dependency, so the round-trip tests read the exposition back
# with this parser, written from the 0.0.4 text format spec and strict where it says "must".


@dataclass
class Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: list[tuple[str, dict[str, str], str]] = field(default_factory=list)


def _unescape(text: str, escapes: dict[str, str]) -> str:
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            out.append(escapes[next(chars)])
        else:
            out.append(char)
    return "".join(out)


def _parse_labels(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at the ``{``; return the labels and the end index."""
    assert text[pos] == "{"
    pos += 1
    labels: dict[str, str] = {}
    while text[pos] != "}":
        eq = text.index("=", pos)
        name = text[pos:eq]
        assert text[eq + 1] == '"', text
        pos = eq + 2
        value: list[str] = []
        while text[pos] != '"':
            if text[pos] == "\\":
                value.append({"\\": "\\", '"': '"', "n": "\n"}[text[pos + 1]])
                pos += 2
            else:
                value.append(text[pos])
                pos += 1
        assert name not in labels
        labels[name] = "".join(value)
        pos += 1
        if text[pos] == ",":
            pos += 1
    return labels, pos + 1


def parse(exposition: str) -> list[Family]:
    assert exposition == "" or exposition.endswith("\n")
    families: list[Family] = []
    for line in exposition.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name, _, text = line[len("# HELP ") :].partition(" ")
            families.append(Family(name, help=_unescape(text, {"\\": "\\", "n": "\n"})))
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert families[-1].name == name
            assert kind in {"counter", "gauge", "histogram"}
            families[-1].type = kind
        else:
            brace = line.find("{")
            space = line.index(" ")
            if brace != -1 and brace < space:
                name = line[:brace]
                labels, end = _parse_labels(line, brace)
            else:
                name, labels, end = line[:space], {}, space
            assert line[end] == " "
            value = line[end + 1 :]
            float(value)  # Go's ParseFloat spellings are also Python's
            assert name.startswith(families[-1].name)
            families[-1].samples.append((name, labels, value))
    return families


# --- Exposition of each type --------------------------------------------------------------


def test_unlabelled_counter_renders_zero_before_any_increment() -> None:
    registry = MetricsRegistry()
    registry.counter("spegeld_restarts_total", "Restarts.")
    assert registry.render() == (
        "# HELP spegeld_restarts_total Restarts.\n"
        "# TYPE spegeld_restarts_total counter\n"
        "spegeld_restarts_total 0\n"
    )


def test_counter_increments_and_formats_like_go() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("bytes_total", "Bytes.")
    counter.inc()
    counter.inc(2)
    assert registry.render().endswith("bytes_total 3\n")
    counter.inc(0.5)
    assert registry.render().endswith("bytes_total 3.5\n")
    assert counter.labels().value == 3.5


def test_labelled_counter_renders_nothing_until_a_child_exists() -> None:
    registry = MetricsRegistry()
    requests = registry.counter(
        "spegel_mirror_requests_total", "Mirror requests.", ("registry", "cache")
    )
    assert registry.render() == ""
    requests.labels(registry="ghcr.io", cache="miss").inc()
    requests.labels(cache="hit", registry="docker.io").inc(4)
    requests.labels(registry="docker.io", cache="miss")
    assert registry.render() == (
        "# HELP spegel_mirror_requests_total Mirror requests.\n"
        "# TYPE spegel_mirror_requests_total counter\n"
        'spegel_mirror_requests_total{registry="docker.io",cache="hit"} 4\n'
        'spegel_mirror_requests_total{registry="docker.io",cache="miss"} 0\n'
        'spegel_mirror_requests_total{registry="ghcr.io",cache="miss"} 1\n'
    )


def test_children_are_cached_by_label_values() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("c", "C.", ("a", "b"))
    child = counter.labels(a="1", b="2")
    assert counter.labels(b="2", a="1") is child
    assert counter.labels(a="2", b="1") is not child


def test_gauge_set_inc_dec() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("spegeld_peers", "Peers known.")
    gauge.set(5)
    gauge.inc()
    gauge.dec(2.5)
    assert registry.render() == (
        "# HELP spegeld_peers Peers known.\n# TYPE spegeld_peers gauge\nspegeld_peers 3.5\n"
    )
    gauge.dec(10)
    assert registry.render().endswith("spegeld_peers -6.5\n")


def test_gauge_function_is_called_at_scrape_time() -> None:
    registry = MetricsRegistry()
    keys: set[str] = set()
    gauge = registry.gauge("spegel_advertised_keys", "Keys advertised.", ("registry",))
    gauge.labels(registry="docker.io").set_function(lambda: len(keys))
    assert registry.render().endswith('spegel_advertised_keys{registry="docker.io"} 0\n')
    keys |= {"a", "b"}
    assert registry.render().endswith('spegel_advertised_keys{registry="docker.io"} 2\n')


def test_gauge_set_replaces_function_and_inc_refuses_it() -> None:
    gauge = MetricsRegistry().gauge("g", "G.")
    gauge.set_function(lambda: 7)
    assert gauge.labels().value == 7
    with pytest.raises(ValueError, match="set_function"):
        gauge.inc()
    with pytest.raises(ValueError, match="set_function"):
        gauge.dec()
    gauge.set(1)
    gauge.inc()
    assert gauge.labels().value == 2


def test_special_values_use_prometheus_spellings() -> None:
    registry = MetricsRegistry()
    gauges = registry.gauge("g", "G.", ("v",))
    for label, value in [
        ("a", math.inf),
        ("b", -math.inf),
        ("c", math.nan),
        ("d", 1e20),
        ("e", 1e-7),
        ("f", -0.0),
    ]:
        gauges.labels(v=label).set(value)
    assert registry.render().splitlines()[2:] == [
        'g{v="a"} +Inf',
        'g{v="b"} -Inf',
        'g{v="c"} NaN',
        'g{v="d"} 1e+20',
        'g{v="e"} 1e-07',
        'g{v="f"} 0',
    ]


def test_histogram_exposition() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram(
        "spegel_mirror_duration_seconds", "Mirror latency.", ("cache",), buckets=(0.1, 1, 2.5)
    )
    hit = latency.labels(cache="hit")
    for value in (0.05, 0.1, 0.5, 3):
        hit.observe(value)
    latency.labels(cache="miss").observe(1)
    assert registry.render() == (
        "# HELP spegel_mirror_duration_seconds Mirror latency.\n"
        "# TYPE spegel_mirror_duration_seconds histogram\n"
        'spegel_mirror_duration_seconds_bucket{cache="hit",le="0.1"} 2\n'
        'spegel_mirror_duration_seconds_bucket{cache="hit",le="1"} 3\n'
        'spegel_mirror_duration_seconds_bucket{cache="hit",le="2.5"} 3\n'
        'spegel_mirror_duration_seconds_bucket{cache="hit",le="+Inf"} 4\n'
        'spegel_mirror_duration_seconds_sum{cache="hit"} 3.65\n'
        'spegel_mirror_duration_seconds_count{cache="hit"} 4\n'
        'spegel_mirror_duration_seconds_bucket{cache="miss",le="0.1"} 0\n'
        'spegel_mirror_duration_seconds_bucket{cache="miss",le="1"} 1\n'
        'spegel_mirror_duration_seconds_bucket{cache="miss",le="2.5"} 1\n'
        'spegel_mirror_duration_seconds_bucket{cache="miss",le="+Inf"} 1\n'
        'spegel_mirror_duration_seconds_sum{cache="miss"} 1\n'
        'spegel_mirror_duration_seconds_count{cache="miss"} 1\n'
    )


def test_unlabelled_histogram_renders_empty_buckets() -> None:
    registry = MetricsRegistry()
    registry.histogram("h", "H.", buckets=(1, math.inf))
    assert registry.render() == (
        "# HELP h H.\n"
        "# TYPE h histogram\n"
        'h_bucket{le="1"} 0\n'
        'h_bucket{le="+Inf"} 0\n'
        "h_sum 0\n"
        "h_count 0\n"
    )


def test_default_buckets() -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    assert histogram.upper_bounds == (*DEFAULT_BUCKETS, math.inf)
    histogram.observe(0.3)
    assert dict(histogram.labels().buckets())[0.25] == 0
    assert dict(histogram.labels().buckets())[0.5] == 1


def test_metrics_render_in_registration_order() -> None:
    registry = MetricsRegistry()
    registry.gauge("zeta", "Z.")
    registry.counter("alpha", "A.")
    assert [family.name for family in parse(registry.render())] == ["zeta", "alpha"]


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


# --- Escaping --------------------------------------------------------------------------


def test_label_values_are_escaped() -> None:
    registry = MetricsRegistry()
    registry.counter("c", "C.", ("path",)).labels(path='a\\b"c\nd').inc()
    assert registry.render().splitlines()[2] == r'c{path="a\\b\"c\nd"} 1'


def test_help_is_escaped_but_quotes_are_not() -> None:
    registry = MetricsRegistry()
    registry.counter("c", 'Say "hi"\\\nthen leave.')
    assert registry.render().splitlines()[0] == r'# HELP c Say "hi"\\\nthen leave.'


# --- Validation ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "a.b"])
def test_invalid_metric_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        MetricsRegistry().counter(name, "Bad.")


@pytest.mark.parametrize("name", ["a:b", "_a", ":a", "A9_z"])
def test_valid_metric_names(name: str) -> None:
    MetricsRegistry().gauge(name, "Fine.")


@pytest.mark.parametrize(
    ("labelnames", "message"),
    [
        (("a:b",), "invalid label name"),
        (("1a",), "invalid label name"),
        (("",), "invalid label name"),
        (("__name__",), "reserved"),
        (("a", "a"), "duplicate"),
    ],
)
def test_invalid_label_names(labelnames: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricsRegistry().counter("c", "C.", labelnames)


def test_histogram_reserves_le() -> None:
    with pytest.raises(ValueError, match="'le'"):
        MetricsRegistry().histogram("h", "H.", ("le",))
    MetricsRegistry().counter("c", "C.", ("le",))


def test_same_name_twice() -> None:
    registry = MetricsRegistry()
    registry.counter("x", "X.")
    with pytest.raises(ValueError, match="clashes"):
        registry.gauge("x", "X.")


@pytest.mark.parametrize("other", ["h_bucket", "h_sum", "h_count", "h"])
def test_histogram_sample_names_clash(other: str) -> None:
    registry = MetricsRegistry()
    registry.histogram("h", "H.")
    with pytest.raises(ValueError, match="clashes"):
        registry.counter(other, "C.")
    later = MetricsRegistry()
    later.counter(other, "C.")
    with pytest.raises(ValueError, match="clashes"):
        later.histogram("h", "H.")


def test_failed_registration_leaves_the_name_free() -> None:
    registry = MetricsRegistry()
    with pytest.raises(ValueError, match="reserved"):
        registry.counter("c", "C.", ("__x",))
    registry.counter("c", "C.")


@pytest.mark.parametrize(
    "labels", [{}, {"a": "1"}, {"a": "1", "b": "2", "c": "3"}, {"a": "1", "c": "3"}]
)
def test_labels_must_match_labelnames(labels: dict[str, str]) -> None:
    counter = MetricsRegistry().counter("c", "C.", ("a", "b"))
    with pytest.raises(ValueError, match=r"takes labels \['a', 'b'\]"):
        counter.labels(**labels)


def test_unlabelled_shortcuts_refuse_labelled_metrics() -> None:
    registry = MetricsRegistry()
    with pytest.raises(ValueError, match="call labels"):
        registry.counter("c", "C.", ("a",)).inc()
    with pytest.raises(ValueError, match="call labels"):
        registry.gauge("g", "G.", ("a",)).set(1)
    with pytest.raises(ValueError, match="call labels"):
        registry.histogram("h", "H.", ("a",)).observe(1)
    with pytest.raises(ValueError, match="takes labels"):
        registry.counter("d", "D.").labels(a="1")


@pytest.mark.parametrize("amount", [-1, -0.001, math.nan, -math.inf])
def test_counters_only_go_up(amount: float) -> None:
    counter = MetricsRegistry().counter("c", "C.")
    with pytest.raises(ValueError, match="only go up"):
        counter.inc(amount)
    assert counter.labels().value == 0


def test_label_values_must_be_utf8_strings() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("c", "C.", ("code",))
    with pytest.raises(TypeError, match="must be str"):
        counter.labels(code=200)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UTF-8"):
        counter.labels(code="\udcff")
    assert registry.render() == ""


@pytest.mark.parametrize(
    ("buckets", "message"),
    [((1, 1), "strictly increase"), ((2, 1), "strictly increase"), ((1, math.nan), "NaN")],
)
def test_invalid_buckets(buckets: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricsRegistry().histogram("h", "H.", buckets=buckets)


def test_histogram_refuses_nan() -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    with pytest.raises(ValueError, match="NaN"):
        histogram.observe(math.nan)
    assert histogram.labels().count == 0


# --- Histogram bucket math -------------------------------------------------------------


def test_bucket_bounds_are_inclusive() -> None:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=(-1, 0, 1))
    for value in (-1, 0, 1, 1.0000001, math.inf, -math.inf):
        histogram.observe(value)
    assert histogram.labels().buckets() == [(-1, 2), (0, 3), (1, 4), (math.inf, 6)]
    assert histogram.labels().count == 6


def test_only_inf_bucket() -> None:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=())
    histogram.observe(42)
    assert histogram.labels().buckets() == [(math.inf, 1)]


@given(
    buckets=st.lists(st.floats(-1e6, 1e6), unique=True, max_size=8).map(sorted),
    values=st.lists(st.floats(-1e7, 1e7), max_size=30),
)
def test_buckets_count_every_value_at_or_below_each_bound(
    buckets: list[float], values: list[float]
) -> None:
    histogram = Histogram("h", "H.", buckets=buckets)
    for value in values:
        histogram.observe(value)
    child = histogram.labels()
    assert child.buckets() == [
        (bound, sum(value <= bound for value in values)) for bound in (*buckets, math.inf)
    ]
    assert child.count == len(values)
    assert child.sum == pytest.approx(math.fsum(values), abs=1e-3)


# --- Round trips through the parser ----------------------------------------------------

label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True).filter(
    lambda name: not name.startswith("__") and name != "le"
)


@given(labels=st.dictionaries(label_names, st.text(), min_size=1, max_size=4))
def test_label_values_round_trip(labels: dict[str, str]) -> None:
    registry = MetricsRegistry()
    counter = registry.counter("c", "C.", labels)
    gauge = registry.gauge("g", "G.", labels)
    histogram = registry.histogram("h", "H.", labels, buckets=(1,))
    counter.labels(**labels).inc()
    gauge.labels(**labels).set(2)
    histogram.labels(**labels).observe(0.5)

    families = parse(registry.render())

    assert [(f.name, f.type) for f in families] == [
        ("c", "counter"),
        ("g", "gauge"),
        ("h", "histogram"),
    ]
    assert families[0].samples == [("c", labels, "1")]
    assert families[1].samples == [("g", labels, "2")]
    assert families[2].samples == [
        ("h_bucket", {**labels, "le": "1"}, "1"),
        ("h_bucket", {**labels, "le": "+Inf"}, "1"),
        ("h_sum", labels, "0.5"),
        ("h_count", labels, "1"),
    ]


@given(values=st.lists(st.text(), min_size=1, max_size=6, unique=True))
def test_children_round_trip_sorted(values: list[str]) -> None:
    registry = MetricsRegistry()
    counter = registry.counter("c", "C.", ("v",))
    for n, value in enumerate(values, start=1):
        counter.labels(v=value).inc(n)
    (family,) = parse(registry.render())
    assert [(labels["v"], value) for _, labels, value in family.samples] == sorted(
        (value, str(n)) for n, value in enumerate(values, start=1)
    )


@given(help=st.text())
def test_help_round_trips(help: str) -> None:
    registry = MetricsRegistry()
    registry.gauge("g", help)
    (family,) = parse(registry.render())
    assert family.help == help


# --- Values read at scrape time -----------------------------------------------------------


def test_counter_function_is_read_at_scrape_time_and_refuses_inc() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("process_cpu_seconds_total", "CPU.")
    seconds = [1.5]
    counter.set_function(lambda: seconds[0])
    assert registry.render().endswith("process_cpu_seconds_total 1.5\n")
    seconds[0] = 2.0
    assert registry.render().endswith("process_cpu_seconds_total 2\n")
    with pytest.raises(ValueError, match="set_function"):
        counter.inc()


def test_scrape_hooks_run_before_every_render() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("spegel_advertised_image_tags", "Tags.", ("registry",))
    held = {"docker.io": 2}

    def refresh() -> None:
        for (registry_label,) in gauge.label_values():
            gauge.labels(registry=registry_label).set(0)
        for name, count in held.items():
            gauge.labels(registry=name).set(count)

    registry.on_scrape(refresh)
    assert registry.render().endswith('spegel_advertised_image_tags{registry="docker.io"} 2\n')
    held = {"ghcr.io": 1}
    assert registry.render().endswith(
        'spegel_advertised_image_tags{registry="docker.io"} 0\n'
        'spegel_advertised_image_tags{registry="ghcr.io"} 1\n'
    )
    assert gauge.label_values() == [("docker.io",), ("ghcr.io",)]
