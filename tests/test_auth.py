"""HTTP Basic auth over every route, the users file, the CLI and the server configuration."""

from __future__ import annotations

import base64
import io
import os
import re

import dash
import pytest

from attention_lens import cli
from attention_lens.server import (
    ConfigError,
    ServerConfig,
    create_server,
    is_loopback,
    read_users,
    write_user,
)

PASSWORD = "correct horse battery"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "users.txt"
    write_user(path, "alice", PASSWORD)
    write_user(path, "bob", "another password", method="pbkdf2")
    return path


@pytest.fixture(scope="module")
def app(users_file):
    # many deliberate failures from one address below: a generous sign-in rate
    app = create_server(ServerConfig(auth_file=users_file, auth_rate="1000/minute"))

    @app.callback(dash.Output("auth-test-out", "children"), dash.Input("auth-test-in", "value"))
    def echo(value):
        return f"got {value}"

    client = app.server.test_client()
    assert client.get("/", headers=basic("alice", PASSWORD)).status_code == 200
    return app


@pytest.fixture(scope="module")
def routes(app):
    """One request of every route class: (name, method, path, json body)."""
    client = app.server.test_client()
    html = client.get("/", headers=basic("alice", PASSWORD)).get_data(as_text=True)
    suites = re.findall(r'src="(/_dash-component-suites/[^"]+)"', html)
    assets = re.findall(r'href="(/assets/[^"?]+)', html)
    assert suites and assets, "the index page should reference scripts and stylesheets"
    callback = {"output": "auth-test-out.children",
                "outputs": {"id": "auth-test-out", "property": "children"},
                "inputs": [{"id": "auth-test-in", "property": "value", "value": "x"}],
                "changedPropIds": ["auth-test-in.value"]}
    return [
        ("page", "GET", "/", None),
        ("page path", "GET", "/attention", None),
        ("dash layout", "GET", "/_dash-layout", None),
        ("dash dependencies", "GET", "/_dash-dependencies", None),
        ("dash callback", "POST", "/_dash-update-component", callback),
        ("component suite", "GET", suites[0], None),
        ("asset", "GET", assets[0], None),
        ("favicon", "GET", "/_favicon.ico", None),
        ("api index", "GET", "/api/", None),
        ("api models", "GET", "/api/models", None),
        ("api predict", "POST", "/api/predict", {"text": "hello there", "top_k": 2}),
        ("api weights", "GET", "/api/weights?layer=0&head=1", None),
    ]


def test_every_route_needs_credentials(app, routes):
    client = app.server.test_client()
    for name, method, path, body in routes:
        r = client.open(path, method=method, json=body)
        assert r.status_code == 401, (name, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Basic"), name
        assert b"Traceback" not in r.data


def test_every_route_works_with_credentials(app, routes):
    client = app.server.test_client()
    for user, password in (("alice", PASSWORD), ("bob", "another password")):
        for name, method, path, body in routes:
            r = client.open(path, method=method, json=body, headers=basic(user, password))
            assert r.status_code == 200, (name, user, r.status_code, r.data[:200])
    r = client.post("/_dash-update-component", json=routes[4][3], headers=basic("bob",
                                                                               "another password"))
    assert "got x" in r.get_data(as_text=True)


def test_wrong_password_unknown_user_and_malformed_headers_are_401(app, routes):
    client = app.server.test_client()
    bad_headers = [
        basic("alice", "wrong password"), basic("alice", PASSWORD + " "), basic("alice", ""),
        basic("mallory", PASSWORD), basic("", ""), basic("bob", PASSWORD),
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()},
        {"Authorization": "Bearer abc"}, {"Authorization": "Basic"}, {"Authorization": ""},
    ]
    for headers in bad_headers:
        for name, method, path, body in routes[:1] + routes[4:5] + routes[9:11]:
            r = client.open(path, method=method, json=body, headers=headers)
            assert r.status_code == 401, (headers, name, r.status_code)


def test_users_file_holds_salted_hashes_only(users_file):
    text = users_file.read_text()
    assert PASSWORD not in text and "another password" not in text
    users = read_users(users_file)
    assert users["alice"].startswith("scrypt:") and users["bob"].startswith("pbkdf2:")
    assert oct(os.stat(users_file).st_mode & 0o777) == "0o600"
    write_user(users_file.with_name("u2.txt"), "alice", PASSWORD)
    assert read_users(users_file.with_name("u2.txt"))["alice"] != users["alice"]  # salted


def test_a_new_user_works_without_restart(app, users_file):
    client = app.server.test_client()
    assert client.get("/api/models", headers=basic("carol", "carols password")).status_code == 401
    write_user(users_file, "carol", "carols password")
    assert client.get("/api/models", headers=basic("carol", "carols password")).status_code == 200


def test_add_user_command(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users.txt"
    answers = iter(["s3cret-passphrase", "s3cret-passphrase"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt="": next(answers))
    with pytest.raises(SystemExit) as exc:
        cli.main(["add-user", "dana", "--auth-file", str(path)])
    assert exc.value.code == 0 and "added user 'dana'" in capsys.readouterr().out
    assert "s3cret" not in path.read_text() and "dana:" in path.read_text()

    answers = iter(["first-password", "second-password"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["add-user", "erin", "--auth-file", str(path)])
    assert exc.value.code == 1 and "erin" not in path.read_text()

    monkeypatch.setattr("sys.stdin", io.StringIO("piped-password\n"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["add-user", "dana", "--auth-file", str(path), "--password-stdin"])
    assert exc.value.code == 0 and "updated user 'dana'" in capsys.readouterr().out

    for bad_name in ("a:b", "with space", ""):
        monkeypatch.setattr("sys.stdin", io.StringIO("long-enough-password\n"))
        with pytest.raises(SystemExit) as exc:
            cli.main(["add-user", bad_name, "--auth-file", str(path), "--password-stdin"])
        assert exc.value.code == 2


def test_non_loopback_without_users_file_refuses_to_start(tmp_path, capsys, users_file):
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        ServerConfig(host="0.0.0.0").check_exposure()
    ServerConfig(host="0.0.0.0", allow_anonymous=True).check_exposure()
    ServerConfig(host="0.0.0.0", auth_file=users_file).check_exposure()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        ServerConfig(host=host).check_exposure()
    with pytest.raises(SystemExit) as exc:  # refuses before building anything
        cli.main(["serve", "--host", "0.0.0.0", "--port", "1"])
    assert exc.value.code == 2 and "--allow-anonymous" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        ServerConfig().check_exposure(["0.0.0.0"])
    assert not is_loopback("example.org") and is_loopback("[::1]")


def test_config_from_environment_and_flags():
    env = {"ATTENTION_LENS_HOST": "0.0.0.0", "ATTENTION_LENS_PORT": "9001",
           "ATTENTION_LENS_MODELS_DIRS": f"/a{os.pathsep}/b", "ATTENTION_LENS_MAX_TOKENS": "64",
           "ATTENTION_LENS_DEBUG": "no", "ATTENTION_LENS_ALLOW_ANONYMOUS": "true",
           "ATTENTION_LENS_URL_PREFIX": "lens", "ATTENTION_LENS_CACHE_SIZE": "5",
           "ATTENTION_LENS_MAX_MODELS": "1", "ATTENTION_LENS_DEVICE": "cpu",
           "ATTENTION_LENS_MODEL": "attn-only-1l", "ATTENTION_LENS_AUTH_FILE": "/etc/users"}
    cfg = ServerConfig.from_env(env)
    assert (cfg.host, cfg.port, cfg.max_tokens, cfg.debug, cfg.allow_anonymous) == \
        ("0.0.0.0", 9001, 64, False, True)
    assert [str(p) for p in cfg.models_dirs] == ["/a", "/b"] and cfg.url_prefix == "/lens/"
    assert (cfg.cache_size, cfg.max_models, cfg.model, str(cfg.auth_file)) == \
        (5, 1, "attn-only-1l", "/etc/users")
    assert ServerConfig.from_env(env, port=7, debug=True).port == 7  # flags win
    args = cli.parse(["--port", "8123", "--models-dir", "/x", "--models-dir", "/y"])
    assert args.command == "serve"
    cfg = cli.config_from_args(args)
    assert cfg.port == 8123 and [str(p) for p in cfg.models_dirs] == ["/x", "/y"]
    assert cfg.debug is False and cfg.host == "127.0.0.1"  # debug off unless asked
    for bad in ({"ATTENTION_LENS_PORT": "eighty"}, {"ATTENTION_LENS_DEBUG": "maybe"},
                {"ATTENTION_LENS_MAX_TOKENS": "0"}, {"ATTENTION_LENS_URL_PREFIX": "/a?b"}):
        with pytest.raises(ConfigError):
            ServerConfig.from_env(bad)


def test_url_prefix_serves_everything_under_it(users_file):
    app = create_server(ServerConfig(url_prefix="/lens/", auth_file=users_file))
    client = app.server.test_client()
    auth = basic("alice", PASSWORD)
    assert client.get("/lens/", headers=auth).status_code == 200
    html = client.get("/lens/", headers=auth).get_data(as_text=True)
    scripts = re.findall(r'src="([^"]+)"', html)
    assert scripts and all(s.startswith("/lens/") for s in scripts)
    assert client.get(scripts[-1], headers=auth).status_code == 200
    assert client.get(scripts[-1]).status_code == 401
    assert client.get("/lens/api/models", headers=auth).status_code == 200
    assert client.get("/lens/api/models").status_code == 401
    r = client.post("/lens/api/predict", json={"text": "x"}, headers=auth)
    assert r.status_code == 200 and r.get_json()["n_tokens"] == 1
    assert client.get("/api/models", headers=auth).status_code == 404


def test_debug_is_off_and_missing_users_file_is_an_error(tmp_path):
    assert ServerConfig().debug is False
    with pytest.raises(ConfigError, match="does not exist"):
        create_server(ServerConfig(auth_file=tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="no users"):
        create_server(ServerConfig(auth_file=empty))


def test_torch_threads_setting():
    import torch

    from attention_lens.server import build_registry

    assert ServerConfig.from_env({"ATTENTION_LENS_TORCH_THREADS": "1"}).torch_threads == 1
    assert cli.config_from_args(cli.parse(["--torch-threads", "2"])).torch_threads == 2
    for bad in ({"ATTENTION_LENS_TORCH_THREADS": "0"}, {"ATTENTION_LENS_TORCH_THREADS": "x"}):
        with pytest.raises(ConfigError):
            ServerConfig.from_env(bad)
    before = torch.get_num_threads()
    try:
        build_registry(ServerConfig(torch_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
