"""personabot: persona chatbots for Discord, Matrix and the terminal, on a budget."""

__version__ = "0.1.0"
