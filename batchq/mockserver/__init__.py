"""The built-in OpenAI-compatible endpoint, for the demo, the tests and users' dry runs."""

from batchq.mockserver.live import MockOptions, MockServer, serve_forever

__all__ = ["MockOptions", "MockServer", "serve_forever"]
