"""gunicorn settings for flask_app: 2 worker processes x 16 threads each.

The app is loaded in each worker after the fork (``preload_app`` stays off), so
each configures memofill with its own connection pool. An app that preloads
must configure memofill in ``post_fork`` instead (see the docs' deployment page).
"""

bind = "127.0.0.1:8000"
workers = 2
worker_class = "gthread"
threads = 16
timeout = 30
