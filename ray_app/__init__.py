"""ray-llmops: the whole life of a chat model on Ray (fine-tune, track, store, serve, chat, retrain)."""

__version__ = "0.1.0"
