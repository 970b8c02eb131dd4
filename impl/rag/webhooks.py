"""Webhooks: a tenant's URLs that its job and document events are POSTed to, signed by the
Standard Webhooks convention, fed by the event log (impl/rag/events.py) as an outbox.

Each webhook holds a cursor: the id of the last event it is done with (delivered, or given up
after the last attempt). A delivery loop in every server process claims webhooks that have
events past their cursor with a conditional UPDATE (a lease, like jobs), sends their events in
order, and moves the cursor. Two processes never hold one webhook's lease at once, so in the
normal case an event is sent once; a process that dies between a receiver's answer and the
cursor's update leaves the event to be sent again when its lease expires: delivery is
at least once, and receivers dedupe on ``webhook-id`` (the event's id).

The SSRF guard resolves the URL's host at every delivery, refuses it when any address is not
public (unless the server allows private addresses), and connects to the address it checked,
so a DNS answer that changes between the check and the connection cannot redirect it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import logging
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CursorResult,
    Integer,
    String,
    Text,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from impl.db import Base, decode_time_cursor, encode_time_cursor, open_database, utcnow
from impl.errors import DependencyUnavailable, InvalidInput, NotFound, WebhookUrlRefused
from impl.rag.events import Event, EventRow, event_of
from impl.settings import Settings

log = logging.getLogger("ragapi.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105  (the prefix, not a secret)
MAX_URL_LENGTH = 2048
# A claimed webhook is its process's for this long; its deliveries stop taking new events at
# half of it, and one delivery takes at most about 3 timeouts (connect, send, answer; at most
# 10 s each), so the lease never runs out under a working process.
LEASE = timedelta(seconds=60)
EVENTS_PER_CLAIM = 50
_ANSWER_BYTES = 65536  # read of a receiver's answer, which only its status matters


class WebhookRow(Base):
    __tablename__ = "webhooks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256), index=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str] | None] = mapped_column(JSON)  # None: every type
    description: Mapped[str | None] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    # The last event this webhook is done with; events after it are still to be sent.
    cursor: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    # Failed attempts at the event after the cursor, and when the next one is due.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    last_event_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    last_attempted_at: Mapped[datetime | None]
    last_attempts: Mapped[int | None] = mapped_column(Integer)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_delivered: Mapped[bool | None] = mapped_column(Boolean)


@dataclass(frozen=True)
class Delivery:
    event_id: int
    attempted_at: datetime
    attempts: int
    status_code: int | None
    error: str | None
    delivered: bool


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    event_types: list[str] | None
    description: str | None
    created_at: datetime
    last_delivery: Delivery | None


@dataclass(frozen=True)
class CreatedWebhook:
    webhook: Webhook
    secret: str


def _webhook(row: WebhookRow) -> Webhook:
    last = None
    if row.last_event_id is not None and row.last_attempted_at is not None:
        last = Delivery(
            event_id=row.last_event_id,
            attempted_at=row.last_attempted_at,
            attempts=row.last_attempts or 1,
            status_code=row.last_status_code,
            error=row.last_error,
            delivered=bool(row.last_delivered),
        )
    return Webhook(row.id, row.url, row.event_types, row.description, row.created_at, last)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value: ``v1,`` and the base64 HMAC-SHA256, keyed
    with the secret's decoded bytes, of ``{id}.{timestamp}.{body}``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address the host resolves to (raises OSError when it resolves to none)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # An IPv6 link-local answer carries its zone ("fe80::1%eth0"), which ip_address refuses.
    return list(
        dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found)
    )


def _target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of an http(s) URL; InvalidInput otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput("The webhook URL's port is not valid.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("A webhook URL is http:// or https:// with a host.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to the address that was checked, whatever the host resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address; the certificate is verified for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Webhooks:
    """The webhooks, in the registry's database, and this process's delivery loop."""

    def __init__(self, settings: Settings, render: Callable[[Event], bytes]) -> None:
        """``render``: an event's JSON, the body of its delivery (the web layer's, so that a
        webhook receives what the event streams send)."""
        self._settings = settings
        self._render = render
        self._db = open_database(settings.resolved_registry_url)
        try:
            self._db.ensure_schema(upgrade=settings.registry_upgrades_on_start)
        except BaseException:
            self._db.close()
            raise
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    # -- the resource -------------------------------------------------------------------------

    def check_url(self, url: str) -> None:
        """Refuse a URL that is not http(s), or whose host is, or resolves only to, addresses
        webhooks are not sent to. A host that does not resolve now is taken: it may later."""
        if len(url) > MAX_URL_LENGTH:
            raise InvalidInput(f"A webhook URL has at most {MAX_URL_LENGTH} characters.")
        _scheme, host, port, _path = _target(url)
        if self._settings.webhooks_allow_private:
            return
        try:
            addresses = _addresses(host, port)
        except (OSError, UnicodeError, ValueError):
            return
        if not any(is_public(address) for address in addresses):
            raise WebhookUrlRefused(
                f"{host} is a non-public address (loopback, private, link-local, multicast, "
                "unspecified or reserved); webhooks are not sent there "
                "(RAGAPI_WEBHOOKS_ALLOW_PRIVATE)."
            )

    def create(
        self, tenant: str, url: str, event_types: list[str] | None, description: str | None
    ) -> CreatedWebhook:
        self.check_url(url)
        secret = SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()
        with self._db.write() as session:
            # From now on: the events already in the log are not this webhook's.
            last = session.scalar(select(func.max(EventRow.id))) or 0
            row = WebhookRow(
                id=f"whk_{uuid.uuid4().hex}",
                tenant=tenant,
                url=url,
                event_types=event_types,
                description=description,
                secret=secret,
                created_at=utcnow(),
                cursor=last,
                attempts=0,
            )
            session.add(row)
            session.flush()
            return CreatedWebhook(_webhook(row), secret)

    def get(self, tenant: str, webhook_id: str) -> Webhook:
        with self._db.read() as session:
            row = session.get(WebhookRow, webhook_id)
            if row is None or row.tenant != tenant:
                raise NotFound(f"webhook {webhook_id} not found")
            return _webhook(row)

    def list(
        self, tenant: str, *, limit: int, cursor: str | None
    ) -> tuple[list[Webhook], str | None]:
        """Newest first; the cursor is the last webhook's (created_at, id)."""
        query = select(WebhookRow).where(WebhookRow.tenant == tenant)
        if cursor is not None:
            created, last_id = decode_time_cursor(cursor)
            query = query.where(
                or_(
                    WebhookRow.created_at < created,
                    (WebhookRow.created_at == created) & (WebhookRow.id < last_id),
                )
            )
        query = query.order_by(WebhookRow.created_at.desc(), WebhookRow.id.desc()).limit(limit + 1)
        with self._db.read() as session:
            rows = list(session.scalars(query))
        page = [_webhook(row) for row in rows[:limit]]
        more = len(rows) > limit
        return page, encode_time_cursor(page[-1].created_at, page[-1].id) if more else None

    def delete(self, tenant: str, webhook_id: str) -> None:
        with self._db.write() as session:
            row = session.get(WebhookRow, webhook_id)
            if row is None or row.tenant != tenant:
                raise NotFound(f"webhook {webhook_id} not found")
            session.delete(row)

    # -- delivery -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = threading.Thread(target=self._run, name="webhook-delivery", daemon=True)
        self._loop.start()

    def close(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(self._settings.webhooks_timeout_seconds * 2 + 5)
        self._db.close()

    def _run(self) -> None:
        while not self._stop.wait(self._settings.webhooks_poll_seconds):
            try:
                self.deliver_due()
            except DependencyUnavailable:
                continue  # the registry's Dependency logged the outage once; the next poll retries
            except Exception:  # the loop outlives any one failure; the next poll tries again
                log.exception("webhook delivery failed")

    def deliver_due(self) -> None:
        """Claim each webhook that has events to send and is due, and send them."""
        now = utcnow()
        with self._db.read() as session:
            newest = session.scalar(select(func.max(EventRow.id))) or 0
            due = session.scalars(
                select(WebhookRow.id).where(
                    WebhookRow.cursor < newest,
                    or_(WebhookRow.next_attempt_at.is_(None), WebhookRow.next_attempt_at <= now),
                    or_(WebhookRow.lease_until.is_(None), WebhookRow.lease_until < now),
                )
            ).all()
        for webhook_id in due:
            if self._stop.is_set():
                return
            owner = self._claim(webhook_id)
            if owner is not None:
                try:
                    self._deliver(webhook_id, owner)
                finally:
                    self._release(webhook_id, owner)

    def _claim(self, webhook_id: str) -> str | None:
        owner = uuid.uuid4().hex
        now = utcnow()
        with self._db.write() as session:
            claimed = cast(
                CursorResult[Any],
                session.execute(
                    update(WebhookRow)
                    .where(
                        WebhookRow.id == webhook_id,
                        or_(WebhookRow.lease_until.is_(None), WebhookRow.lease_until < now),
                    )
                    .values(lease_owner=owner, lease_until=now + LEASE)
                ),
            )
        return owner if claimed.rowcount == 1 else None

    def _release(self, webhook_id: str, owner: str) -> None:
        with self._db.write() as session:
            session.execute(
                update(WebhookRow)
                .where(WebhookRow.id == webhook_id, WebhookRow.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )

    def _deliver(self, webhook_id: str, owner: str) -> None:
        started = time.monotonic()
        with self._db.read() as session:
            hook = session.get(WebhookRow, webhook_id)
            if hook is None:
                return
            # Read first (ids become visible in order): every event up to it that this
            # webhook takes is in the page below, so the cursor may pass the others.
            newest = session.scalar(select(func.max(EventRow.id))) or 0
            query = select(EventRow).where(
                EventRow.tenant == hook.tenant,
                EventRow.id > hook.cursor,
                EventRow.id <= newest,
            )
            if hook.event_types is not None:
                query = query.where(EventRow.type.in_(hook.event_types))
            events = list(session.scalars(query.order_by(EventRow.id).limit(EVENTS_PER_CLAIM)))
            url, secret, attempts = hook.url, hook.secret, hook.attempts
        for event in events:
            if time.monotonic() - started > LEASE.total_seconds() / 2:
                return
            outcome = self.send(url, secret, event)
            attempts += 1
            done = outcome.delivered or attempts >= self._settings.webhooks_max_attempts
            if not outcome.delivered:
                log.warning(
                    "webhook %s: event %s attempt %d failed: %s",
                    webhook_id,
                    event.id,
                    attempts,
                    outcome.error or outcome.status_code,
                )
            values: dict[str, Any] = {
                "last_event_id": event.id,
                "last_attempted_at": utcnow(),
                "last_attempts": attempts,
                "last_status_code": outcome.status_code,
                "last_error": outcome.error,
                "last_delivered": outcome.delivered,
            }
            if done:
                values |= {"cursor": event.id, "attempts": 0, "next_attempt_at": None}
            else:
                delay = self._settings.webhooks_retry_base_seconds * 2 ** (attempts - 1)
                values |= {
                    "attempts": attempts,
                    "next_attempt_at": utcnow() + timedelta(seconds=delay),
                }
            if not self._record(webhook_id, owner, values) or not done:
                return
            attempts = 0
        if len(events) < EVENTS_PER_CLAIM:
            self._record(webhook_id, owner, {"cursor": newest}, only_below=newest)

    def _record(
        self, webhook_id: str, owner: str, values: dict[str, Any], only_below: int | None = None
    ) -> bool:
        """Store a delivery's result while this process still holds the lease; False when
        it does not (the webhook was deleted, or the lease passed to another process)."""
        query = update(WebhookRow).where(
            WebhookRow.id == webhook_id, WebhookRow.lease_owner == owner
        )
        if only_below is not None:
            query = query.where(WebhookRow.cursor < only_below)
        with self._db.write() as session:
            changed = cast(CursorResult[Any], session.execute(query.values(**values)))
        return changed.rowcount == 1

    def send(self, url: str, secret: str, event: EventRow) -> Outcome:
        """One signed POST of the event, to an address the SSRF guard allows."""
        message_id = str(event.id)
        body = self._render(event_of(event))
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "ragapi-webhooks",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message_id, timestamp, body),
        }
        try:
            scheme, host, port, path = _target(url)
            addresses = _addresses(host, port)
        except (InvalidInput, OSError, UnicodeError, ValueError) as exc:
            return Outcome(None, f"cannot resolve {url}: {exc}")
        refused = [a for a in addresses if not is_public(a)]
        if refused and not self._settings.webhooks_allow_private:
            return Outcome(None, f"refused: {host} resolves to non-public {refused[0]}")
        timeout = self._settings.webhooks_timeout_seconds
        pinned = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        connection = pinned(host, port, str(addresses[0]), timeout)
        try:
            connection.request("POST", path, body=body, headers=headers)
            answer = connection.getresponse()
            answer.read(_ANSWER_BYTES)
            return Outcome(answer.status, None if 200 <= answer.status < 300 else answer.reason)
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()
