"""The fault-injection support itself: the proxy's modes over real sockets, and the throw-away
cluster's stop modes and cleanup."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest
from faults import Cluster, Proxy, cluster_unavailable
from helpers import wait_for


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """A listening socket the proxy relays to; the test accepts the server side itself."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        yield listener


@pytest.fixture
def proxy(upstream: socket.socket) -> Iterator[Proxy]:
    with Proxy("127.0.0.1", upstream.getsockname()[1]) as relay:
        yield relay


def connect(proxy: Proxy, upstream: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client connection through the proxy and the server's end of it."""
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    server, _ = upstream.accept()
    server.settimeout(5)
    return client, server


def silent(sock: socket.socket, seconds: float = 0.3) -> bool:
    """True when nothing (not even an end of stream) arrives on `sock` for `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def read(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes (TCP may split them), or fewer if the stream ends."""
    data = b""
    while len(data) < size and (more := sock.recv(size - len(data))):
        data += more
    return data


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pass_relays_both_ways(proxy, upstream):
    client, server = connect(proxy, upstream)
    with client, server:
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        server.sendall(b"pong")
        assert client.recv(4) == b"pong"
        assert proxy.links == 1


def test_blackhole_holds_both_directions_and_keeps_the_link_open(proxy, upstream):
    client, server = connect(proxy, upstream)
    with client, server:
        proxy.blackhole()
        client.sendall(b"to server")
        server.sendall(b"to client")
        assert silent(server) and silent(client)  # nothing forwarded, nothing closed
        assert proxy.links == 1
        client.sendall(b", more")
        proxy.heal()
        assert read(server, 15) == b"to server, more"
        assert read(client, 9) == b"to client"
        client.sendall(b"again")
        assert server.recv(5) == b"again"


def test_a_connection_made_during_a_blackhole_reaches_the_server_on_heal(proxy, upstream):
    proxy.blackhole()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.sendall(b"hello")
        upstream.settimeout(0.3)
        with pytest.raises(TimeoutError):
            upstream.accept()  # like a SYN on a dead path: the server never hears of it
        upstream.settimeout(5)
        assert silent(client)
        proxy.heal()
        server, _ = upstream.accept()
        with server:
            assert read(server, 5) == b"hello"
            server.sendall(b"hi")
            assert read(client, 2) == b"hi"


def test_a_side_that_closes_during_a_blackhole_closes_the_other(proxy, upstream):
    client, server = connect(proxy, upstream)
    with server:
        proxy.blackhole()
        client.close()
        assert closed(server)
    wait_for(lambda: proxy.links == 0, what="the link to go")


def test_cut_closes_every_link_and_refuses_until_healed(proxy, upstream):
    links = [connect(proxy, upstream) for _ in range(3)]
    proxy.cut()
    for client, server in links:
        assert closed(client) and closed(server)
        client.close()
        server.close()
    assert proxy.links == 0
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as refused:
        assert closed(refused)
    proxy.heal()
    client, server = connect(proxy, upstream)
    with client, server:
        client.sendall(b"back")
        assert server.recv(4) == b"back"


def test_a_relay_to_a_server_that_is_down_closes_at_once():
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        port = nobody.getsockname()[1]  # bound, not listening: connections are refused
        with (
            Proxy("127.0.0.1", port) as relay,
            socket.create_connection(("127.0.0.1", relay.port), timeout=5) as client,
        ):
            assert closed(client)


def test_cluster_stops_fast_and_immediate_and_is_removed():
    if reason := cluster_unavailable():
        pytest.skip(reason)
    with Cluster() as pg:
        pg.start()
        directory = pg.dir
        assert pg.port != 5432
        for mode in ("fast", "immediate"):
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS t (n int)")
                conn.execute("INSERT INTO t VALUES (1)")
            pg.restart(mode)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
        pg.stop("immediate")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn(), connect_timeout=2)
    assert not directory.exists()
