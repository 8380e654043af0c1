"""Models: the Ollama client, the local llama.cpp model, and the router that picks between them."""

from bot.brains.base import Brain, CallStats, ChatRequest, Chunk
from bot.brains.router import Answer, BrainRouter

__all__ = ["Answer", "Brain", "BrainRouter", "CallStats", "ChatRequest", "Chunk"]
