"""`costeer proxy`: an OpenAI-compatible endpoint on the device that answers every chat
completion with CoSteer, so any app that speaks the OpenAI API (a chat UI, an editor
assistant, LangChain's ``ChatOpenAI``, the ``openai`` client) is personalized by
changing its base URL.

`app` wires the routes; `request` reads what a client asks, `response` shapes what it
gets back, `errors` answers failures in OpenAI's error shape, `users` maps API keys to
users, `running` runs a generation that ends when its client hangs up, `cloud` builds
the shared `PersonalLLM` from the command line's options. Needs the ``serve`` extra.
"""

from costeer_sdk.extras import require

for _module in ("fastapi", "uvicorn"):
    require(_module, "serve", "costeer proxy")
