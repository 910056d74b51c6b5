"""The README's two set-up commands and its API examples stay true."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import restored_background

from attention_lens.server import ServerConfig, create_server

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _curl_examples() -> list[list[str]]:
    block = README.split("## JSON API", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#")[0].replace("$B", "http://127.0.0.1:8050/api"))
            for line in block.splitlines() if line.startswith("curl ")]


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    app_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert app_cmd.endswith("app.py") and "pip install" in app_cmd
    assert test_cmd.endswith("python -m pytest") and "chromium-driver" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs exactly the README's test command after installing the browser
    assert test_cmd.split("&& ", 1)[1] in ci


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with restored_background():
        app = create_server(ServerConfig(cache_size=8,
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
        c = app.server.test_client()
        assert c.get("/").status_code == 200
        yield c


def test_every_endpoint_has_an_example():
    paths = {urlsplit(next(a for a in args if a.startswith("http"))).path
             for args in _curl_examples()}
    for endpoint in ("models", "predict", "token-predictions", "attention", "activations",
                     "embeddings", "weights", "analogy", "eigenvalues", "induction-score",
                     "logit-lens", "attribution", "ablation"):
        assert f"/api/{endpoint}" in paths, endpoint


@pytest.mark.parametrize("args", _curl_examples(), ids=lambda a: " ".join(a[1:4])[:60])
def test_curl_example_answers_200(client, args):
    method, body, url, content_type = "GET", None, None, None
    rest = args[1:]
    while rest:
        tok = rest.pop(0)
        if tok == "-X":
            method = rest.pop(0)
        elif tok in ("-d", "--json"):  # as curl sends them: -d a form, --json a JSON POST
            body = json.loads(rest.pop(0))
            method = "POST" if method == "GET" else method
            content_type = "application/json" if tok == "--json" else \
                "application/x-www-form-urlencoded"
        else:
            url = tok
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    r = client.open(path, method=method, data=None if body is None else json.dumps(body),
                    content_type=content_type)
    assert r.status_code == 200, (path, r.get_json())
    assert r.is_json
    data = r.get_json()
    sent = dict(body or {})
    sent.update({k: int(v[0]) if v[0].lstrip("-").isdigit() else v[0]
                 for k, v in parse_qs(parts.query).items()})
    assert "error" not in data, data
    # the answer is about what was sent: the default model, the prompt's tokens, the
    # parameters it names again, and as many entries as top_k asked for
    model = data.get("model", data.get("default", (data.get("a") or {}).get("model")))
    assert model == "attn-only-2l", data.keys()  # /api/compare names it per side
    prompt = data.get("prompt") or data.get("a") or data  # /api/compare: side a
    if "text" in sent:
        assert prompt["n_tokens"] == len(prompt["tokens"]) > 0
    for where in (data, data.get("result") or {}):
        for key, value in sent.items():
            if key not in ("text", "position") and _scalar(value) and _scalar(where.get(key)):
                if isinstance(value, int) and value < 0:  # a position from the end, resolved
                    n = prompt.get("n_tokens") or len(prompt.get("tokens") or [])
                    assert where[key] == n + value, (path, key, where[key], value)
                    continue
                assert where[key] == value, (path, key, where[key], value)
    if "top_k" in sent:
        assert sent["top_k"] in set(_lengths(data)), (path, sent["top_k"])


def _scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool))


def _lengths(value):
    """Lengths of every list in a JSON value, at any depth."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _lengths(v)
    elif isinstance(value, list):
        yield len(value)
        for v in value[:3]:
            yield from _lengths(v)
