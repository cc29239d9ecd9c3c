"""LangChain's standard integration suite against the embedded default pair (Qwen2.5-Coder
1.5B cloud, 0.5B local, both in this process). Replies are capped at 12 tokens so the
suite runs in minutes on 2 CPU cores; every instance shares one loaded pair.

Skipped by the suite itself, and why that is right here:
- tool calling, tool choice, structured output, JSON mode: CoSteer steers free-text
  decoding; ChatCoSteer raises NotImplementedError for ``bind_tools`` and ValueError for
  tool messages rather than pretend (``has_tool_calling`` etc. are False).
- image, audio, PDF, video inputs: the models are text-only (``supports_*_inputs``
  False); non-text content blocks raise ValueError.
- model override: one ChatCoSteer is one loaded model pair; a per-call ``model`` is
  only reported in traces (``supports_model_override`` False).
- VCR (recorded HTTP) tests: nothing goes over HTTP in-process (``enable_vcr_tests``
  False).
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_costeer import ChatCoSteer

pytestmark = pytest.mark.real_models


class TestChatCoSteerIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatCoSteer]:
        return ChatCoSteer

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 12}

    @property
    def supports_model_override(self) -> bool:
        return False
