"""``InfluxUplink``: telemetry to InfluxDB 2 / Cloud (or anything speaking its v2 write API) as line protocol.

Owns the InfluxDB client (``influxdb-client``'s asyncio API, created lazily inside the running loop) and the one
translation of its errors into ``UplinkError``. The only module importing ``influxdb_client``.

Which errors are retryable: timeouts, connection errors, 429 and 5xx (the server may accept later); 401/403/404
too, because a wrong token or a missing bucket is fixed by an operator and the data must still be there then.
400, 413 and 422 are not: the request itself is refused (a malformed point, a field type conflict, too large), so
the runner splits it until the refused point is alone and quarantines that one.

Compression: the body is gzipped (level 1) in a worker thread, where zlib runs without holding the GIL, and sent
with ``Content-Encoding: gzip`` through the client's ``WriteService``; the client's own ``enable_gzip`` would
compress at a higher level on the event loop, which halved the replay rate in ``bench/outbox.py``.

The ``historical`` flag has no place in a TSDB (a series is keyed by its timestamp; a backfilled point simply lands
at its time), so InfluxDB writes are the same for live and replayed data, and idempotent.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.errors import UplinkError
from gateway.uplinks.base import StreamKind, UplinkBatch
from gateway.uplinks.config import InfluxConfig
from gateway.uplinks.lineprotocol import LineProtocolEncoder

if TYPE_CHECKING:
    from gateway.config.site import Site

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({401, 403, 404, 408, 425, 429})


class InfluxUplink:
    kinds: frozenset[StreamKind] = frozenset({"telemetry"})

    def __init__(self, config: InfluxConfig, *, site: Site) -> None:
        self.config = config
        gateway = site.config.gateway
        self.encoder = LineProtocolEncoder(
            site.registry,
            common_tags={**config.extra_tags, "site": gateway.site, "gateway": gateway.id},
            include_personal=config.include_personal,
        )
        self._client: Any = None
        self._writer: Any = None

    def _connect(self) -> Any:
        if self._writer is None:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
            from influxdb_client.service.write_service import WriteService

            token = self.config.token_value()
            self._client = InfluxDBClientAsync(
                url=self.config.url,
                token=token.reveal() if token is not None else "",
                org=self.config.org,
                enable_gzip=False,  # we compress ourselves, off the event loop
                timeout=int(self.config.delivery.timeout * 1000),
            )
            self._writer = WriteService(self._client.api_client)  # type: ignore[no-untyped-call]
        return self._writer

    async def send(self, batch: UplinkBatch) -> None:
        body = self.encoder.encode(batch.samples())
        if not body:
            return  # only BAD, non-finite or withheld personal values: nothing for a TSDB
        from influxdb_client.client.exceptions import InfluxDBError

        writer = self._connect()
        encoding: dict[str, str] = {}
        if self.config.gzip:
            body = await asyncio.to_thread(gzip.compress, body, 1)
            encoding["content_encoding"] = "gzip"
        try:
            await writer.post_write_async(
                org=self.config.org,
                bucket=self.config.bucket,
                body=body,
                precision="ns",
                async_req=False,
                _return_http_data_only=False,
                content_type="text/plain; charset=utf-8",
                **encoding,
            )
        except InfluxDBError as exc:
            status = getattr(exc, "response", None)
            code = getattr(status, "status", None)
            message = f"HTTP {code}: {exc.message if hasattr(exc, 'message') else exc}"
            retryable = code is None or code in _RETRYABLE_STATUS or code >= 500
            raise UplinkError(f"InfluxDB refused the write: {message}", retryable=retryable) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UplinkError(f"InfluxDB at {self.config.url} unreachable: {exc!r}", retryable=True) from exc

    async def maintain(self, closing: asyncio.Event) -> None:
        """Nothing to keep open between writes (HTTP): the connection pool reconnects by itself."""

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._writer = None
