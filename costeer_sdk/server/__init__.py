"""`costeer serve`: the cloud side over HTTP (FastAPI). `app` serves the session
protocol, `openai_routes` the OpenAI-compatible subset, `completions` the decoding
behind ``/v1/completions``. Needs the ``serve`` extra."""

from costeer_sdk.extras import require

for _module in ("fastapi", "uvicorn"):
    require(_module, "serve", "costeer serve")
