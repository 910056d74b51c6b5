"""Run Attention Lens: ``python app.py [--host H] [--port P] [--model NAME] ...``.

Imported (``gunicorn "app:server"``), it builds the server from the ``ATTENTION_LENS_*``
environment variables and exposes ``server`` (the Flask app) and ``app`` (the Dash app).
"""

from attention_lens.cli import main

if __name__ == "__main__":
    main()
else:
    from attention_lens.server import create_server, server_from_env

    app = server_from_env()
    server = app.server

    __all__ = ["app", "server", "create_server"]
