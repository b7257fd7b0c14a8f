"""``python -m tests.openai_server --port 0 --latency 0.05``: serve on 127.0.0.1 until killed."""

from .server import main

main()
