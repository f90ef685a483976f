"""The OIDC key fetcher under hostile or failing issuers: total deadlines, one fetch, backoff, own threads.

Real HTTP servers on 127.0.0.1 port 0; the fetcher's clock (backoff, refetch intervals) is fake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from broker.config.settings import OidcIssuerConfig
from broker.domain.errors import IssuerUnavailable
from broker.testing.clock import FakeClock
from broker.testing.jwt_issuer import OidcProvider
from broker.verify import JwksFetcher, OidcVerifier

NOW = 1_800_000_000.0
AUD = "spiffe://example.org/broker"


class SlowLoris:
    """An HTTP server that answers one byte at a time, every `pace` seconds, for as long as the client reads.

    `mode` "headers" trickles the status line and headers; "body" sends the headers at once and
    then trickles a body that never completes. `closed` is set when a client hangs up.
    """

    def __init__(self, mode: str, pace: float = 0.05) -> None:
        self.mode = mode
        self.pace = pace
        self.connections = 0
        self.closed = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.issuer = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.jwks_uri = self.issuer + "/jwks"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    self.closed.set()
                    return
                data += chunk
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            if self.mode == "body":
                conn.sendall(head)
                head = b" " * 1_000_000   # JSON whitespace: it would parse, if it ever ended
            for byte in head:
                # The pace and the hang-up check in one: wait for the client to speak (EOF) or the pace.
                readable, _, _ = select.select([conn], [], [], self.pace)
                if self._stop.is_set():
                    return
                if readable and not conn.recv(1):
                    self.closed.set()
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    self.closed.set()
                    return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture(params=["headers", "body"])
def loris(request: pytest.FixtureRequest) -> Iterator[SlowLoris]:
    server = SlowLoris(request.param)
    yield server
    server.close()


@pytest.fixture
def healthy() -> Iterator[OidcProvider]:
    with OidcProvider() as p:
        yield p


def _verifier(issuer: str, jwks_uri: str, fetcher: JwksFetcher) -> OidcVerifier:
    return OidcVerifier(OidcIssuerConfig(issuer=issuer, audience=AUD, jwks_uri=jwks_uri), fetcher=fetcher)


def _loris_token(loris: SlowLoris, healthy: OidcProvider) -> str:
    return healthy.id_token("mallory", AUD, now=NOW, claims={"iss": loris.issuer})


def test_a_slow_loris_fetch_ends_at_its_total_deadline(loris: SlowLoris) -> None:
    fetcher = JwksFetcher(clock=FakeClock(start=NOW), timeout=0.3)
    with pytest.raises(IssuerUnavailable):
        asyncio.run(fetcher.key_set(loris.issuer, loris.jwks_uri))
    # The fetching thread hung up at its deadline; a per-read timeout would keep reading for minutes.
    assert loris.closed.wait(5)


def test_a_slow_loris_issuer_does_not_starve_a_healthy_one(loris: SlowLoris, healthy: OidcProvider) -> None:
    fetcher = JwksFetcher(clock=FakeClock(start=NOW), timeout=0.5, max_workers=2)
    slow = _verifier(loris.issuer, loris.jwks_uri, fetcher)
    good = _verifier(healthy.issuer, healthy.jwks_uri, fetcher)
    forged = _loris_token(loris, healthy)

    async def burst() -> list[object]:
        slow_calls = [slow.verify(forged, now=NOW) for _ in range(20)]
        return await asyncio.gather(*slow_calls, good.verify(healthy.id_token("alice", AUD, now=NOW), now=NOW),
                                    return_exceptions=True)

    results = asyncio.run(burst())
    assert all(isinstance(r, IssuerUnavailable) for r in results[:-1])
    assert results[-1].principal.endswith("#alice")   # type: ignore[union-attr]
    for _ in range(10):   # later requests within the backoff start no new fetch
        with pytest.raises(IssuerUnavailable):
            asyncio.run(slow.verify(forged, now=NOW))
    assert loris.connections == 1


def test_an_issuer_never_fetched_is_not_asked_again_within_the_backoff(healthy: OidcProvider) -> None:
    clock = FakeClock(start=NOW)
    fetcher = JwksFetcher(clock=clock, retry_after=5.0)
    v = _verifier(healthy.issuer, healthy.jwks_uri, fetcher)
    token = healthy.id_token("alice", AUD, now=NOW)
    healthy.set_available(False)
    for _ in range(50):   # 50 requests with a matching iss while the issuer is down: one GET
        with pytest.raises(IssuerUnavailable):
            asyncio.run(v.verify(token, now=NOW))
    assert healthy.jwks_requests == 1

    clock.advance(5)
    healthy.set_available(True)
    assert asyncio.run(v.verify(token, now=clock.now())).principal.endswith("#alice")
    assert healthy.jwks_requests == 2


def test_the_backoff_doubles_after_each_failure_up_to_its_cap(healthy: OidcProvider) -> None:
    clock = FakeClock(start=NOW)
    fetcher = JwksFetcher(clock=clock, retry_after=5.0, max_backoff=12.0)
    healthy.set_available(False)
    waits = []
    for _ in range(4):
        before = healthy.jwks_requests
        waited = 0
        while healthy.jwks_requests == before:
            with pytest.raises(IssuerUnavailable):
                asyncio.run(fetcher.key_set(healthy.issuer, healthy.jwks_uri))
            clock.advance(1)
            waited += 1
        waits.append(waited)
    assert waits[1:] == [5, 10, 12]


def test_fetches_run_on_their_own_threads_not_the_loops_default_executor(healthy: OidcProvider) -> None:
    fetcher = JwksFetcher(clock=FakeClock(start=NOW), timeout=1.0)
    release = threading.Event()

    async def with_a_busy_default_executor() -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        blocker = loop.run_in_executor(None, release.wait, 10)
        try:
            return len(await fetcher.key_set(healthy.issuer, healthy.jwks_uri))
        finally:
            release.set()
            await blocker

    assert asyncio.run(with_a_busy_default_executor()) >= 1
