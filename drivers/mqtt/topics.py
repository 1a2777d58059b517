"""MQTT topic filters and topic templates: which part of a topic names the device.

Owns: ``check_topic_filter`` (the MQTT 3.1.1/5 filter grammar, checked at config load) and ``TopicTemplate``, which
turns ``zigbee2mqtt/{device}`` or ``tele/{device}/SENSOR`` into a matcher that returns the device's topic name (and
an optional ``{field}`` segment, for one-value-per-topic devices such as ``shellies/{device}/relay/0/{field}``).

Pure string code: imports no protocol library and nothing of the gateway, so config validation can use it.
"""

from __future__ import annotations

from typing import Final

DEVICE: Final = "{device}"
FIELD: Final = "{field}"
#: MQTT limits a topic to 65,535 bytes of UTF-8
MAX_TOPIC_BYTES: Final = 65535


def check_topic_filter(topic: str) -> str:
    """Return ``topic`` if it is a valid subscription filter, else raise ValueError saying what is wrong."""
    if not topic:
        raise ValueError("a topic filter cannot be empty")
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError("a topic filter is at most 65535 bytes")
    if "\0" in topic:
        raise ValueError("a topic filter cannot contain NUL")
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"'#' must be a whole level and the last one: {topic!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level (like a/+/b): {topic!r}")
    return topic


class TopicTemplate:
    """Where ``{device}`` (and optionally ``{field}``) sit in the topics one subscription receives.

    A template has as many levels as the topics it maps; each level is literal text, a placeholder, or ``+`` for
    a level that varies but means nothing here (``application/+/device/{device}/event/up``).
    Placeholders may only stand where the filter has a wildcard, so a template can never promise a device
    segment that the broker would not vary.

    Where ``{device}`` stands under the filter's ``#`` (``zigbee2mqtt/#`` with ``zigbee2mqtt/{device}`` or
    ``zigbee2mqtt/{device}/availability``), it spans as many levels as the topic has beyond the template's other
    levels: a Zigbee2MQTT friendly name containing ``/`` (``floor1/kitchen/lamp``) is one device.
    """

    __slots__ = ("_device_index", "_field_index", "_levels", "_literals", "_spans", "text")

    def __init__(self, text: str, topic_filter: str) -> None:
        check_topic_filter(topic_filter)
        self.text = text
        levels = text.split("/")
        filter_levels = topic_filter.split("/")
        if levels.count(DEVICE) != 1:
            raise ValueError(f"a topic template needs exactly one whole level {DEVICE}: {text!r}")
        if levels.count(FIELD) > 1:
            raise ValueError(f"a topic template may have at most one {FIELD}: {text!r}")
        multi = filter_levels[-1] == "#"
        fixed = filter_levels[:-1] if multi else filter_levels
        if len(levels) < len(fixed) or (not multi and len(levels) != len(fixed)):
            raise ValueError(
                f"template {text!r} has {len(levels)} levels but filter {topic_filter!r} matches "
                f"{'at least ' if multi else ''}{len(fixed)}"
            )
        literals: list[tuple[int, str]] = []
        for index, level in enumerate(levels):
            wildcard = index >= len(fixed) or fixed[index] == "+"
            if level in (DEVICE, FIELD, "+"):
                if not wildcard:
                    raise ValueError(
                        f"template level {index + 1} ({level}) must sit where the filter {topic_filter!r} "
                        "has a + or # wildcard"
                    )
                continue
            if "{" in level or "}" in level or "+" in level or "#" in level:
                raise ValueError(
                    f"unknown placeholder {level!r} in template {text!r} (use {DEVICE}, {FIELD} or + for any level)"
                )
            if not wildcard and level != fixed[index]:
                raise ValueError(f"template level {index + 1} {level!r} differs from the filter's {fixed[index]!r}")
            literals.append((index, level))
        self._levels = len(levels)
        self._device_index = levels.index(DEVICE)
        self._field_index = levels.index(FIELD) if FIELD in levels else -1
        #: the device may span several levels (it sits under '#'); levels after it are counted from the end
        self._spans = multi and self._device_index >= len(fixed)
        # Every literal level is checked, not only those under a wildcard: with several subscriptions on one
        # connection, the template is also what tells which subscription a message belongs to.
        self._literals = tuple(literals)

    @property
    def spans_levels(self) -> bool:
        """Whether the device may be several topic levels (a friendly name with '/')."""
        return self._spans

    @property
    def has_field(self) -> bool:
        return self._field_index >= 0

    def match(self, topic: str) -> tuple[str, str | None] | None:
        """``(device topic name, field or None)`` for a topic this template maps, else None."""
        parts = topic.split("/")
        if self._spans:
            return self._match_spanning(parts)
        if len(parts) != self._levels:
            return None
        for index, text in self._literals:
            if parts[index] != text:
                return None
        device = parts[self._device_index]
        if not device:
            return None
        field = parts[self._field_index] if self._field_index >= 0 else None
        return device, field

    def _match_spanning(self, parts: list[str]) -> tuple[str, str | None] | None:
        extra = len(parts) - self._levels  # how many more levels than one the device takes
        if extra < 0:
            return None
        first = self._device_index

        def at(index: int) -> int:  # a template level's position in the topic
            return index if index < first else index + extra

        for index, text in self._literals:
            if parts[at(index)] != text:
                return None
        device_levels = parts[first : first + extra + 1]
        if "" in device_levels:
            return None
        field = parts[at(self._field_index)] if self._field_index >= 0 else None
        return "/".join(device_levels), field

    @classmethod
    def default_for(cls, topic_filter: str) -> TopicTemplate:
        """The template implied by a filter with exactly one ``+``: that level names the device."""
        levels = check_topic_filter(topic_filter).split("/")
        if levels.count("+") != 1 or "#" in levels:
            raise ValueError(
                f"filter {topic_filter!r} needs a template saying which level names the device "
                f"(e.g. template: {topic_filter.replace('#', DEVICE).replace('+', DEVICE, 1)!r})"
            )
        return cls("/".join(DEVICE if level == "+" else level for level in levels), topic_filter)
