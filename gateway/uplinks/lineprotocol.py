"""InfluxDB line protocol, built in bulk from samples and the point registry.

Owns the mapping from points to series: measurement = the point's ``measurement`` (its device profile's model by
default), tags = the point's tags plus ``site`` and ``gateway`` (plus configured extra tags), field = the point's
name, timestamp = the sample's ``ts`` in nanoseconds. Samples of one device read together (same measurement, tags
and timestamp) share one line, as InfluxDB stores them best. Imports no protocol library.

What is not written: BAD samples (a communication failure has no value, DESIGN.md), and non-finite floats (NaN,
±inf), which no InfluxDB accepts; both are counted. Personal points (``PointInfo.personal``), and points the registry
does not know, are withheld unless the uplink opted in with ``include_personal`` (an InfluxDB inside the building,
docs/privacy.md); they are counted too. Ints of ``kind: int`` points are written as integers (``5i``),
other numbers as floats, so a field never changes type between writes (InfluxDB refuses that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from gateway.model import Quality, Sample
from gateway.registry import PointInfo

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n"})


def escape_measurement(text: str) -> str:
    return text.replace("\\", "\\\\").translate(_MEASUREMENT_ESCAPES)


def escape_key(text: str) -> str:
    """Tag keys, tag values and field keys."""
    return text.replace("\\", "\\\\").translate(_KEY_ESCAPES)


def quote_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LineProtocolEncoder:
    """Turns sample batches into line protocol bytes. Series keys are computed once per point and cached."""

    def __init__(
        self, registry: Mapping[str, PointInfo], *, common_tags: Mapping[str, str], include_personal: bool
    ) -> None:
        self.registry = registry
        self.common_tags = dict(common_tags)
        #: no default: whoever builds an encoder decides, in so many words, whether personal data may go out
        self.include_personal = include_personal
        self._series: dict[str, tuple[str, str, str]] = {}
        self._withheld: set[str] = set()
        self.skipped_bad = 0
        self.skipped_non_finite = 0
        self.skipped_personal = 0

    def _series_of(self, point: str) -> tuple[str, str, str] | None:
        """``(measurement,tags prefix, escaped field key, value kind)`` for ``point``; None if it is withheld."""
        cached = self._series.get(point)
        if cached is not None:
            return cached
        if point in self._withheld:
            return None
        device, _, name = point.partition(".")
        info = self.registry.get(point)
        if not self.include_personal and (info is None or info.personal):
            if info is not None:  # an unknown point is not remembered: a rule reload may still register it
                self._withheld.add(point)
            return None
        if info is None:  # not in the registry (should not happen): still keep the value, under the device
            measurement, tags, kind = "gateway", {"device": device}, ""
        else:
            measurement, tags, kind = info.measurement, dict(info.tags), info.kind
            tags.setdefault("device", device)
        tags.update(self.common_tags)
        tag_text = "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()) if v != "")
        series = (escape_measurement(measurement) + tag_text, escape_key(name), kind)
        self._series[point] = series
        return series

    def _format(self, value: object, kind: str) -> str | None:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return f"{value}i" if kind == "int" else f"{float(value)!r}"
        if isinstance(value, float):
            if not math.isfinite(value):
                self.skipped_non_finite += 1
                return None
            if kind == "int" and value.is_integer():
                return f"{int(value)}i"
            return repr(value)
        if isinstance(value, str):
            return quote_string(value)
        return None

    def encode(self, samples: Iterable[Sample]) -> bytes:
        # The hot path of a replay (millions of samples): floats, the common case, are formatted inline; samples
        # of one read arrive together, so the previous line is tried before the dict.
        lines: dict[tuple[str, int], list[str]] = {}
        series = self._series
        last_key: tuple[str, int] | None = None
        last_fields: list[str] = []
        bad = Quality.BAD
        for point, value, ts, quality, _reason in samples:
            if quality is bad or value is None:
                self.skipped_bad += 1
                continue
            cached = series.get(point)
            if cached is None:
                cached = self._series_of(point)
                if cached is None:
                    self.skipped_personal += 1
                    continue
            prefix, field_key, kind = cached
            if type(value) is float and kind != "int":
                if value - value != 0.0:  # NaN or ±inf
                    self.skipped_non_finite += 1
                    continue
                text = f"{field_key}={value!r}"
            else:
                formatted = self._format(value, kind)
                if formatted is None:
                    continue
                text = f"{field_key}={formatted}"
            if last_key is not None and last_key[1] == ts and last_key[0] == prefix:
                last_fields.append(text)
                continue
            last_key = (prefix, ts)
            fields = lines.get(last_key)
            if fields is None:
                fields = lines[last_key] = []
            fields.append(text)
            last_fields = fields
        return "\n".join([f"{prefix} {','.join(fields)} {ts}" for (prefix, ts), fields in lines.items()]).encode()
