"""gunicorn settings for a lab server.

Use: ``gunicorn -c python:attention_lens.server.gunicorn_conf app:server`` behind a reverse proxy
(nginx, Caddy) that terminates TLS and buffers slow clients; gunicorn itself listens on
loopback only.

Command-line flags given after ``-c`` win (``-w``, ``-b``, ``--threads``, ...).

What survives what (see the README's fault table): every web worker reads the one signing
secret (``ATTENTION_LENS_SECRET_KEY``, or the private ``secret`` file in the cache folder),
so a respawned worker, a restarted gunicorn or a restarted Redis accepts the pages already
open; a page whose poll fails while gunicorn restarts keeps retrying (assets/job_poll.js).
"""

#: Loopback: the proxy in front is the only client.
bind = "127.0.0.1:8050"
#: Threads with a deadline on reading each request (slow clients cannot hold them).
worker_class = "attention_lens.server.gunicorn_worker.ReadDeadlineWorker"
threads = 8
#: Idle kept-alive connections wait in the worker's poller, not in a thread.
keepalive = 5
#: A worker whose main loop stops answering the master for this long is restarted. Threads
#: busy with a request do not stop it (analyses have their own deadlines: background jobs,
#: and heavy API requests, run as jobs with ``ATTENTION_LENS_JOB_DEADLINE``).
timeout = 120
graceful_timeout = 30
#: Each worker is replaced after about this many requests (a fresh process gives back the
#: memory a long run fragments); open pages are unaffected (one shared secret).
max_requests = 5000
max_requests_jitter = 500
#: Request line: a shareable link keeps long prompts server-side, so 8 KiB is plenty.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
