"""Run Attention Lens: ``python app.py [--host H] [--port P] [--model NAME]``.

``server`` is the Flask server for ``gunicorn app:server``.
"""

from attention_lens.cli import main

if __name__ == "__main__":
    main()
else:
    from attention_lens.app import create_app

    app = create_app()
    server = app.server
