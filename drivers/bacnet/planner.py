"""Groups a device's due points into the fewest ReadPropertyMultiple requests its APDU size allows. Pure: no I/O.

Owns ``PlannedPoint``, ``ReadRequest``, ``plan_reads`` and ``describe_plan``. Imports no protocol library.

Why estimates: an RPM *answer* must fit in one APDU unless the device can send it in segments, and the device's
limit is ``max-apdu-length-accepted`` of the *requester* (ours, 1476) combined with what the device can send. The
answer's size depends on the values, so each property is budgeted at its largest encoded size for its kind
(ASHRAE 135 clause 20.2: a REAL is 5 bytes with its tag, a status-flags bit string 3, a property error 6); an object
adds its identifier and opening/closing tags. A request planned this way never needs segmentation it cannot get.
A device that still answers "segmentation-not-supported" or "buffer-overflow" has its requests halved (source).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.bacnet.config import ObjectId

#: ComplexACK header (type, invoke id, service choice; 4 with segmentation fields) plus slack
_ACK_HEADER = 6
#: object identifier (context tag + 4 bytes) and the list-of-results opening and closing tags
_PER_OBJECT = 7
#: property identifier (context tag + up to 2 bytes), optional array index (2), result opening/closing tags (2)
_PER_PROPERTY = 7
#: the largest value encoding per kind, or the error encoding (class + code, 6 bytes) when bigger
_VALUE_BYTES = {"float": 9, "int": 6, "bool": 6, "flags": 6, "str": 68}
#: how many segments of an answer we plan for when the device can segment (bacpypes3 accepts more; devices often
#: cap their window small, and a larger answer costs more on a lossy link for no fewer round trips)
SEGMENTS = 4


@dataclass(frozen=True, slots=True)
class PlannedPoint:
    point: str
    object: ObjectId
    property: str
    index: int | None
    #: value kind (float, int, bool, str) for the size estimate and the decoding check
    kind: str


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One ReadPropertyMultiple: per object, its properties (status-flags first when asked for)."""

    objects: tuple[tuple[ObjectId, tuple[tuple[str, int | None], ...]], ...]
    points: tuple[PlannedPoint, ...]
    #: estimated answer size in bytes
    size: int

    @property
    def properties(self) -> int:
        return sum(len(props) for _, props in self.objects)


def _object_size(points: Sequence[PlannedPoint], flags: bool) -> int:
    size = _PER_OBJECT + sum(_PER_PROPERTY + _VALUE_BYTES.get(p.kind, 68) for p in points)
    if flags:
        size += _PER_PROPERTY + _VALUE_BYTES["flags"]
    return size


def answer_budget(max_apdu: int, segmentation: str) -> int:
    """Bytes an RPM answer may take: one APDU, or a few when the device can send segmented answers."""
    if segmentation in ("segmented-both", "segmented-transmit"):
        return max_apdu * SEGMENTS
    return max_apdu


def plan_reads(
    points: Iterable[PlannedPoint], *, budget: int, max_properties: int, status_flags: bool = True
) -> list[ReadRequest]:
    """Pack points (grouped by object, in first-seen order) into requests whose estimated answer fits ``budget``
    bytes and ``max_properties`` properties. An object's properties stay in one request unless the object alone
    is too big; ``status_flags`` adds each object's status-flags once (for the quality of its points)."""
    by_object: dict[ObjectId, list[PlannedPoint]] = {}
    for point in points:
        by_object.setdefault(point.object, []).append(point)
    requests: list[ReadRequest] = []
    objects: list[tuple[ObjectId, tuple[tuple[str, int | None], ...]]] = []
    planned: list[PlannedPoint] = []
    size = _ACK_HEADER
    count = 0

    def flush() -> None:
        nonlocal objects, planned, size, count
        if objects:
            requests.append(ReadRequest(tuple(objects), tuple(planned), size))
        objects, planned, size, count = [], [], _ACK_HEADER, 0

    for obj, group in by_object.items():
        flags = status_flags and obj.type != "device" and all(p.property != "status-flags" for p in group)
        chunks: list[list[PlannedPoint]] = [group]
        whole = _object_size(group, flags)
        if _ACK_HEADER + whole > budget or len(group) + flags > max_properties:
            chunks = [[p] for p in group]  # an object too big for one answer: one property at a time
        for chunk in chunks:
            chunk_flags = flags and chunk is chunks[0]
            need = _object_size(chunk, chunk_flags)
            props = len(chunk) + chunk_flags
            if objects and (size + need > budget or count + props > max_properties):
                flush()
            refs = tuple((p.property, p.index) for p in chunk)
            if chunk_flags:
                refs = (("status-flags", None), *refs)
            objects.append((obj, refs))
            planned.extend(chunk)
            size += need
            count += props
    flush()
    return requests


def split_request(request: ReadRequest) -> list[ReadRequest]:
    """Halve a refused request (by objects, else by properties); a single property cannot be split."""
    if len(request.objects) > 1:
        half = len(request.objects) // 2
        parts = [request.objects[:half], request.objects[half:]]
    elif request.properties > 1:
        obj, refs = request.objects[0]
        half = len(refs) // 2
        parts = [((obj, refs[:half]),), ((obj, refs[half:]),)]
    else:
        return [request]
    result = []
    for objects in parts:
        wanted = {(o, prop, index) for o, refs in objects for prop, index in refs}
        points = tuple(p for p in request.points if (p.object, p.property, p.index) in wanted)
        result.append(ReadRequest(objects, points, request.size // 2))
    return result


def describe_plan(requests: Sequence[ReadRequest], points: int) -> str:
    props = sum(r.properties for r in requests)
    noun = "request" if len(requests) == 1 else "requests"
    return f"{len(requests)} ReadPropertyMultiple {noun} reading {props} properties for {points} points"
