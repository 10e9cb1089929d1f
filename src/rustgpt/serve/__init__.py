"""An OpenAI-compatible HTTP server with continuous batching, and a chat page (the `serve`
extra: pip install 'rustgpt[serve]'). ``create_app(model)`` is the ASGI app, for mounting
in a service of your own; ``rustgpt-cli serve`` runs it under uvicorn
(rustgpt.serve.server)."""

from rustgpt.serve.app import create_app

__all__ = ["create_app"]
