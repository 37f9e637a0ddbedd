"""OpenAI-compatible HTTP server (FastAPI).

Imported only by `tokenmill serve` and tests, never by `import tokenmill`.
"""

from tokenmill.server.app import build_app

__all__ = ["build_app"]
