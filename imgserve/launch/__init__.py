"""Starting things: serve.py (`make run`), stack.py (workers, gunicorn), proxy.py (nginx), local_redis.py."""
