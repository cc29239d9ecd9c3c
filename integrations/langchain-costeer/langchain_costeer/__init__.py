"""LangChain integration for costeer-sdk."""

from langchain_costeer.chat_models import ChatCoSteer

__all__ = ["ChatCoSteer"]
