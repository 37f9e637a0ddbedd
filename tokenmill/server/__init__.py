"""OpenAI-compatible HTTP server (FastAPI): `from tokenmill.server.app import build_app`.

Imported only by `tokenmill serve` and tests, never by `import tokenmill`. This package file imports
nothing, so its pure-Python parts (tool-call parsers) load without fastapi.
"""
