"""LangChain integration for costeer-sdk."""

from langchain_costeer.chat_models import ChatCoSteer
from langchain_costeer.private import Private

__all__ = ["ChatCoSteer", "Private"]
