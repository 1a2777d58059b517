"""The gateway's HTTP server (aiohttp): status page, JSON API, ``/healthz``, ``/readyz`` and ``/metrics``.

Owns routing, authentication and the server's lifecycle; what is shown comes from ``views`` (data), ``page`` (HTML)
and ``gateway.metrics`` (Prometheus, imported at the first scrape of ``/metrics``). Must never import a driver or a
protocol library.

Routes::

    GET /                  status page (HTML; static/status.js makes it live)
    GET /static/...        the page's CSS and JavaScript (package data: works offline, no CDN)
    GET /api/status        everything below in one document (what ``edge-gateway status`` prints)
    GET /api/points        [{id, value, ts (ns), quality, unit, age_s, ...}]  (``edge-gateway tail`` polls this)
    GET /api/history       {point: [[ts_ms, value], ...]}; ?point=ID for one point, ?since_ms=T for newer only
    GET /api/devices       per-device state, polls, errors, latency, last error
    GET /api/rules         {loaded, rules: [{id, state, ...}], problems, error}
    GET /api/uplinks       [{name, state, backlog, sent, ...}]
    GET /api/queues        bus queues and the outbox
    GET /api/alarms        what needs attention now
    GET /api/incentives    today's incentive records
    GET /healthz           liveness: 200 while the event loop answers
    GET /readyz            200 when config is loaded, the outbox writable and a driver running; else 503
    GET /metrics           Prometheus exposition format

Authentication: a bind on anything but loopback requires ``http.token_file`` (the server refuses to start
otherwise). With a token, every route but ``/healthz`` and ``/readyz`` (which reveal nothing but ok/not ok, and are
what probes call) needs ``Authorization: Bearer <token>`` or HTTP basic auth with the token as password (so a
browser can log in with its own dialog).

Host check: a request whose ``Host`` is not an allowed name is refused with 421 (``HostAllowlist``), so a web
page cannot read the page through DNS rebinding (a name of the attacker's resolving to 127.0.0.1). Allowed:
``localhost``, ``127.0.0.1`` and ``[::1]`` on the port the request arrived at, the address it arrived at, and
``http.allowed_hosts``. The probes are exempt. Every response carries a CSP, ``nosniff`` and ``DENY`` for framing.

Start-up checks run when ``serve(...)`` is *called*, before its coroutine is scheduled: a missing token or an
address in use raises at once, with a clear message, instead of failing later inside a task. The address and token
rule lives in ``gateway.http.access``, which ``check`` applies too (``gateway.preflight``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.config.types import Secret
from gateway.errors import GatewayError
from gateway.http import page, views
from gateway.http.access import check_listen

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.status import ServedGateway, StatusSource

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
#: seconds an open keep-alive connection may delay shutdown (the supervisor waits for ``serve`` to return)
SHUTDOWN_GRACE_SECONDS = 0.5
#: routes a load balancer or systemd-style probe calls without credentials
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})

GATEWAY_KEY = web.AppKey("gateway", object)


class MetricsEndpoint:
    """``/metrics``, with its registry built at the first scrape.

    ``gateway.metrics`` and prometheus-client (about 1 MiB RSS) are imported then, not at start: a gateway nobody
    scrapes never loads them. The exposition is the same either way: every figure is read from a status snapshot at
    scrape time, and the process figures from /proc."""

    def __init__(self, gateway: StatusSource) -> None:
        self._gateway = gateway
        self._registry: CollectorRegistry | None = None

    def scrape(self) -> tuple[bytes, str]:
        """The exposition and its content type."""
        from gateway import metrics  # lazy: see the class docstring

        if self._registry is None:
            self._registry = metrics.build_registry(self._gateway)
        return metrics.exposition(self._registry), metrics.CONTENT_TYPE


METRICS_KEY = web.AppKey("metrics", MetricsEndpoint)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServerError(GatewayError):
    """The status server cannot start (address in use, permission denied on a low port)."""


# -- binding (the address and token rule is gateway.http.access, shared with `check`) ----------------------------


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise HttpServerError(f"status page cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# -- JSON -----------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    # Subclasses of builtins come here too (OPT_PASSTHROUGH_SUBCLASS): a Secret that slipped into a status dict
    # must print as *** rather than as its value.
    if isinstance(obj, Secret):
        return "***"
    if isinstance(obj, enum.Enum):
        return obj.value if isinstance(obj.value, str) else obj.name.lower()
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list | tuple):
        return list(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    return str(obj)


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, default=_json_default, option=orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_NON_STR_KEYS)


def json_response(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=dumps(data), status=status, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


# -- handlers -------------------------------------------------------------------------------------------------------


def _gateway(request: web.Request) -> ServedGateway:
    gateway: ServedGateway = request.app[GATEWAY_KEY]  # type: ignore[assignment]
    return gateway


async def _index(request: web.Request) -> web.Response:
    html = page.render(views.overview(_gateway(request)))
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _api_status(request: web.Request) -> web.Response:
    return json_response(views.overview(_gateway(request)))


async def _api_points(request: web.Request) -> web.Response:
    return json_response(views.points(_gateway(request)))


async def _api_history(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    point = request.query.get("point")
    since_text = request.query.get("since_ms", "0")
    try:
        since_ns = int(since_text) * 1_000_000
    except ValueError:
        message = f"since_ms must be an integer (Unix milliseconds), got {since_text!r}"
        return json_response({"error": message}, status=400)
    if point is not None and not gateway.knows_point(point):
        return json_response({"error": f"unknown point {point!r}"}, status=404)
    return json_response(views.history(gateway, point=point, since_ns=since_ns))


async def _api_devices(request: web.Request) -> web.Response:
    return json_response(views.devices(_gateway(request)))


async def _api_rules(request: web.Request) -> web.Response:
    return json_response(views.rules(_gateway(request)))


async def _api_uplinks(request: web.Request) -> web.Response:
    return json_response(views.uplinks(_gateway(request)))


async def _api_queues(request: web.Request) -> web.Response:
    return json_response(views.queues(_gateway(request)))


async def _api_alarms(request: web.Request) -> web.Response:
    return json_response(views.overview(_gateway(request))["alarms"])


async def _api_incentives(request: web.Request) -> web.Response:
    return json_response(views.incentives_today(_gateway(request)))


async def _healthz(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    uptime = (time.time_ns() - gateway.started_ns) / 1e9 if gateway.started_ns else 0.0
    return json_response({"status": "ok", "started": gateway.started.is_set(), "uptime_s": round(uptime, 3)})


async def _readyz(request: web.Request) -> web.Response:
    result = views.readiness(_gateway(request))
    return json_response(result, status=200 if result["ready"] else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].scrape()
    return web.Response(body=body, headers={"Content-Type": content_type})


# -- authentication -------------------------------------------------------------------------------------------------


def _authorised(header: str, token: bytes) -> bool:
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return hmac.compare_digest(credentials.strip().encode(), token)
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        _user, _, password = decoded.partition(b":")
        return hmac.compare_digest(password, token)
    return False


def _auth_middleware(token: Secret) -> Any:
    expected = token.reveal().encode()

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS or _authorised(request.headers.get("Authorization", ""), expected):
            return await handler(request)
        return web.Response(
            status=401,
            text="this gateway's status page needs its access token (HTTP basic auth: any user, token as password)\n",
            headers={"WWW-Authenticate": 'Basic realm="edge-gateway", charset="UTF-8"'},
        )

    return require_token


# -- Host check and security headers --------------------------------------------------------------------------------

#: the names a browser on the gateway itself uses (with the port the server listens on)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def split_host(host: str) -> tuple[str, int | None]:
    """``"Example.org:8080"`` -> ("example.org", 8080); ``"[::1]"`` -> ("[::1]", None). A bad port gives -1."""
    host = host.strip().lower()
    name, sep, port_text = host.rpartition(":")
    if not sep or not name or (name.startswith("[") and not name.endswith("]")):
        return host, None  # no port (a bare IPv6 address without brackets is no valid Host either: never matches)
    return name, int(port_text) if port_text.isdigit() else -1


class HostAllowlist:
    """The ``Host`` values the server answers: the loopback names on the port a request arrived at, the address it
    arrived at (an address in ``Host`` cannot come from DNS rebinding), and the configured names (``name`` on any
    port, ``name:port`` on that port only)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._any_port: set[str] = set()
        self._exact: set[tuple[str, int]] = set()
        for entry in names:
            name, port = split_host(entry)
            if port is None:
                self._any_port.add(name)
            else:
                self._exact.add((name, port))

    def allows(self, host: str, local: tuple[str, int] | None) -> bool:
        name, port = split_host(host)
        if name in self._any_port or (name, port if port is not None else 80) in self._exact:
            return True
        if local is None:
            return False
        local_ip, local_port = local
        if (port if port is not None else 80) != local_port:
            return False
        return name in LOOPBACK_NAMES or name == (f"[{local_ip}]" if ":" in local_ip else local_ip)


def local_address(sockname: object) -> tuple[str, int] | None:
    """The address and port a connection arrived at, from its socket name, as a client writes it in ``Host``."""
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return None
    address = str(sockname[0]).lower()
    with contextlib.suppress(ValueError):
        mapped = ipaddress.ip_address(address)
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
            address = str(mapped.ipv4_mapped)  # an IPv4 client of a dual-stack [::] bind: its Host is the IPv4 form
    return address, int(sockname[1])


def _host_middleware(allowed: HostAllowlist) -> Any:
    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        # No Host at all is no browser (browsers always send one), so no DNS rebinding: HTTP/1.0 tools may go on.
        if (
            host is None
            or request.path in _OPEN_PATHS
            or allowed.allows(host, local_address(request.get_extra_info("sockname")))
        ):
            return await handler(request)
        return web.Response(
            status=421, text=f"this gateway does not answer to host {host[:100]!r}: add it to http.allowed_hosts\n"
        )

    return check_host


#: the page loads its own CSS and script and fetches its own API, nothing from elsewhere, and runs no inline script
#: or style: say so, so a browser enforces it; no one may frame it (clickjacking)
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 404, 405, a static file refused: these answers get the headers too
        exc.headers.update(_SECURITY_HEADERS)
        raise
    response.headers.update(_SECURITY_HEADERS)
    return response


# -- the application ------------------------------------------------------------------------------------------------


def create_app(
    gateway: ServedGateway, *, token: Secret | None = None, allowed_hosts: Iterable[str] = ()
) -> web.Application:
    """The aiohttp application for ``gateway`` (tests drive it with aiohttp's TestServer). ``allowed_hosts``: the
    names allowed in ``Host`` besides loopback names and the address a request arrived at (``HostAllowlist``)."""
    middlewares = [_security_headers, _host_middleware(HostAllowlist(allowed_hosts))]
    if token is not None:
        middlewares.append(_auth_middleware(token))
    app = web.Application(middlewares=middlewares)
    app[GATEWAY_KEY] = gateway
    app[METRICS_KEY] = MetricsEndpoint(gateway)
    app.router.add_get("/", _index)
    app.router.add_static("/static", STATIC_DIR, show_index=False)
    for path, handler in (
        ("/api/status", _api_status),
        ("/api/points", _api_points),
        ("/api/history", _api_history),
        ("/api/devices", _api_devices),
        ("/api/rules", _api_rules),
        ("/api/uplinks", _api_uplinks),
        ("/api/queues", _api_queues),
        ("/api/alarms", _api_alarms),
        ("/api/incentives", _api_incentives),
        ("/healthz", _healthz),
        ("/readyz", _readyz),
        ("/metrics", _metrics),
    ):
        app.router.add_get(path, handler)
    return app


def serve(gateway: ServedGateway, listen: str, stopping: asyncio.Event) -> Coroutine[Any, Any, None]:
    """Check the address and token and bind now (raising ConfigError or HttpServerError); the returned coroutine
    serves until ``stopping`` is set, then closes within ``SHUTDOWN_GRACE_SECONDS``."""
    host, port, token = check_listen(gateway.site, listen)
    sock = _bind(host, port)
    return _serve(gateway, sock, token, stopping)


async def _serve(gateway: ServedGateway, sock: socket.socket, token: Secret | None, stopping: asyncio.Event) -> None:
    app = create_app(gateway, token=token, allowed_hosts=gateway.site.config.http.allowed_hosts)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    try:
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("status page on http://%s:%d/%s", shown, port, " (token required)" if token is not None else "")
        await stopping.wait()
    finally:
        await runner.cleanup()
        sock.close()
