"""Command line: ``attention-lens serve`` (the default) runs the app."""

from __future__ import annotations

import argparse
from typing import Optional

from .registry import DEFAULT_MODEL, DEFAULT_WEIGHTS, Registry


def build_parser() -> argparse.ArgumentParser:
    """Arguments shared by ``python app.py`` and ``attention-lens serve``."""
    ap = argparse.ArgumentParser(prog="attention-lens", description="Run the Attention Lens app.")
    ap.add_argument("command", nargs="?", default="serve", choices=["serve"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8050)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--debug", action="store_true")
    return ap


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point."""
    args = build_parser().parse_args(argv)
    from .app import create_app

    app = create_app(Registry([DEFAULT_WEIGHTS], default=args.model))
    app.run(host=args.host, port=args.port, debug=args.debug)
