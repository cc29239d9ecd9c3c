"""LangChain's standard unit suite. Construction is lazy (models load on the first
call), so these run without loading any model.

Skipped by the suite itself, and why that is right here:
- ``test_serdes``: ChatCoSteer is not LangChain-serializable (``is_lc_serializable`` is
  False): it can wrap a live `PersonalLLM` object, which has no serialized form.
- tool-binding and structured-output tests return early: CoSteer steers free text and
  has no tool calling (``has_tool_calling`` / ``has_structured_output`` are False).
"""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_costeer import ChatCoSteer


class TestChatCoSteerUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatCoSteer]:
        return ChatCoSteer

    @property
    def chat_model_params(self) -> dict:
        return {"model": "builtin:qwen2.5-coder-1.5b-instruct"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"COSTEER_API_KEY": "secret-from-env"}, {}, {"api_key": "secret-from-env"}
