"""Sign-in under a browser's parallel first load, and guessing from one address."""

from __future__ import annotations

import base64
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from werkzeug.serving import make_server

from attention_lens.server import auth
from attention_lens.server import ServerConfig, create_server, write_user

PASSWORD = "correct horse battery"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("signin") / "users.txt"
    for name in ("alice", "bob", "carol", "dave"):
        write_user(path, name, f"{PASSWORD} of {name}")
    return path


@pytest.fixture(scope="module")
def served(users_file):
    """The app on a real threaded HTTP server (127.0.0.1, a free port), as ``python app.py``."""
    app = create_server(ServerConfig(auth_file=users_file))
    http = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    thread.join(10)


def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def page_assets(app) -> list[str]:
    """The scripts and stylesheets the index page makes a browser fetch."""
    client = app.server.test_client()
    html = client.get("/", headers=basic("alice", f"{PASSWORD} of alice")).get_data(as_text=True)
    paths = re.findall(r'(?:src|href)="(/(?:_dash-component-suites|assets)/[^"]+)"', html)
    assert len(paths) >= 8, paths
    return paths


def test_a_browsers_parallel_first_load_is_never_refused(served, monkeypatch):
    app, base = served
    assets = page_assets(app)
    hashes, lock = [0], threading.Lock()
    real = auth.check_password_hash

    def counting(hashed, password):
        with lock:
            hashes[0] += 1
        return real(hashed, password)

    monkeypatch.setattr(auth, "check_password_hash", counting)
    paths = ["/", "/_dash-layout", "/_dash-dependencies", *assets]
    paths = (paths * 16)[:16]
    # three people open the app at once, each a burst of 16 parallel requests with
    # credentials the server has not seen before
    for user in ("bob", "carol", "dave"):
        headers = basic(user, f"{PASSWORD} of {user}")
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda p: get(base + p, headers)[0], paths))
        assert statuses == [200] * 16, (user, statuses)
    print(f"password hashes for 3 bursts of 16 requests: {hashes[0]}")
    assert hashes[0] == 3  # each new credential is hashed once, not once per request


def test_a_wrong_password_burst_counts_as_one_failure(served):
    app, base = served
    assets = page_assets(app)
    headers = basic("carol", "not her password")
    paths = (assets * 12)[:12]  # more than the 10 failures a minute an address may have
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda p: get(base + p, headers)[0], paths))
    assert set(statuses) <= {401}, statuses  # one typo: the address is not throttled
    assert get(base + "/api/models", basic("carol", f"{PASSWORD} of carol"))[0] == 200


def test_guessing_from_one_address_never_locks_the_owner_out_elsewhere(users_file):
    app = create_server(ServerConfig(auth_file=users_file, auth_rate="10/minute"))
    client = app.server.test_client()

    def attempt(user, password, address):
        return client.get("/api/models", headers=basic(user, password),
                          environ_base={"REMOTE_ADDR": address})

    for i in range(20):  # somebody at X guesses alice's password
        assert attempt("alice", f"guess {i}", "10.0.0.66").status_code in (401, 429)
    r = attempt("alice", "guess 21", "10.0.0.66")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0  # X is throttled
    assert attempt("bob", "anything", "10.0.0.66").status_code == 429  # whatever the name
    # alice at her own desk (an address never signed in from) gets in at once
    assert attempt("alice", f"{PASSWORD} of alice", "10.0.0.7").status_code == 200
    # and a typo of hers elsewhere is an ordinary 401, not a lock-out
    assert attempt("alice", "typo", "10.0.0.8").status_code == 401


def test_guessing_behind_the_proxy_is_counted_per_client(users_file):
    app = create_server(ServerConfig(auth_file=users_file, auth_rate="10/minute",
                                     proxy_hops=1))
    client = app.server.test_client()

    def attempt(user, password, client_address):
        return client.get("/api/models", headers={**basic(user, password),
                                                  "X-Forwarded-For": client_address},
                          environ_base={"REMOTE_ADDR": "127.0.0.1"})  # the proxy

    statuses = [attempt("alice", f"guess {i}", "203.0.113.9").status_code for i in range(20)]
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses
    assert attempt("alice", f"{PASSWORD} of alice", "198.51.100.4").status_code == 200


def test_ipv6_guesses_count_per_network():
    throttle = auth.SignInThrottle("3/minute")
    for i in range(3):  # one machine can hold every address of its /64
        assert throttle.retry_after(f"2001:db8:1:2::{i:x}") is None
        throttle.failed(f"2001:db8:1:2::{i:x}")
    assert throttle.retry_after("2001:db8:1:2:ffff::1") is not None
    assert throttle.retry_after("2001:db8:1:3::1") is None
    assert throttle.retry_after("192.0.2.1") is None


@pytest.mark.server
def test_parallel_first_loads_through_gunicorn_as_the_readme_runs_it(tmp_path):
    from test_security_server import readme_server

    server, prefix = readme_server(tmp_path)
    try:
        users = tmp_path / "users.txt"
        _, html = server.get(prefix, basic("alice", PASSWORD))
        assets = re.findall(r'(?:src|href)="(/(?:_dash-component-suites|assets)/[^"]+)"',
                            html.decode())
        paths = ([prefix, prefix + "_dash-layout", prefix + "_dash-dependencies", *assets]
                 * 16)[:16]
        statuses = []
        for user in ("bob", "carol", "dave"):  # added while it runs: new to every worker
            write_user(users, user, f"{PASSWORD} of {user}")
            headers = basic(user, f"{PASSWORD} of {user}")
            with ThreadPoolExecutor(16) as pool:
                statuses += list(pool.map(
                    lambda p: get(f"http://127.0.0.1:{server.port}{p}", headers)[0], paths))
        assert statuses == [200] * 48, statuses
    finally:
        server.stop()


def test_an_unreachable_counts_store_is_a_503_not_a_500(users_file):
    import socket

    with socket.socket() as s:  # a port nothing listens on: Redis is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_server(ServerConfig(auth_file=users_file,
                                     auth_storage=f"redis://127.0.0.1:{port}"))
    client = app.server.test_client()
    r = client.get("/api/models", headers=basic("alice", f"{PASSWORD} of alice"))
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.data[:200]
    assert "try again" in r.get_json()["error"]
