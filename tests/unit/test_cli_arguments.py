"""The command line's shared argument types (``gateway/arguments.py``) and its number format
(``gateway.http.page.format_reading``), as tables: text in, value or refusal out."""

from __future__ import annotations

import argparse

import pytest

from gateway.arguments import duration, gateway_url, host_port, int_range
from gateway.http.page import format_reading


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("1min", 60.0), ("500ms", 0.5), ("2h", 7200.0), ("1.5", 1.5)]
)
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-1", "soon", "1 fortnight", "", "nan"])
def test_duration_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plc.local", ("plc.local", 502)),
        ("10.0.0.5:1502", ("10.0.0.5", 1502)),
        ("[::1]:5020", ("::1", 5020)),
        ("[::1]", ("::1", 502)),
        ("::1", ("::1", 502)),  # more than one colon and no brackets: an IPv6 address without a port
    ],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert host_port(502)(text) == expected


@pytest.mark.parametrize("text", ["localhost:abc", ":502", "host:0", "host:70000", "[::1]x", "host:"])
def test_host_port_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        host_port(502)(text)


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("125", 125), ("010", 10), ("0x10", 16)])
def test_int_range(text: str, value: int) -> None:
    assert int_range(1, 125)(text) == value


@pytest.mark.parametrize("text", ["0", "126", "200", "four", "1.5", ""])
def test_int_range_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        int_range(1, 125)(text)


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://gw.local:8080/", "http://gw.local:8080"),
        ("https://gw.example/edge", "https://gw.example/edge"),
    ],
)
def test_gateway_url(text: str, url: str) -> None:
    assert gateway_url(text) == url


@pytest.mark.parametrize("text", ["ftp://gw", "localhost:abc", "http://", ""])
def test_gateway_url_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        gateway_url(text)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (448.62820512820514, "448.628"),
        (230.10000610351562, "230.1"),
        (21.0, "21"),
        (0.0, "0"),
        (-3.14159265, "-3.14159"),
        (1234567.89, "1234570"),  # no exponent, no thousands separator
        (0.00123456789, "0.00123457"),
        (1.3754203e-36, "1.37542e-36"),  # a wrong word order stays readable
        (412, "412"),
        (True, "True"),
        ("auto", "auto"),
    ],
)
def test_format_reading(value: object, shown: str) -> None:
    assert format_reading(value) == shown
