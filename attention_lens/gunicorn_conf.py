"""gunicorn settings for a lab server.

Use: ``gunicorn -c python:attention_lens.gunicorn_conf app:server``.

Command-line flags given after ``-c`` win (``-w``, ``-b``, ``--threads``, ...).
"""

#: Threads with a deadline on reading each request (slow clients cannot hold them).
worker_class = "attention_lens.gunicorn_worker.ReadDeadlineWorker"
threads = 8
#: Idle kept-alive connections wait in the worker's poller, not in a thread.
keepalive = 5
#: A worker stuck past this (a runaway analysis) is restarted.
timeout = 120
graceful_timeout = 30
#: Request line: a shareable link keeps long prompts server-side, so 8 KiB is plenty.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
