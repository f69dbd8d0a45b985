"""How to start the Chainlit chat process: `llmops chat` runs it in the foreground, the
local stack (`llmops up -s chat`, the demo) in the background."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ray_app import credentials
from ray_app.chat.auth import load_logins
from ray_app.settings import Settings


def chainlit_command(settings: Settings, port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run the chat app for ``settings`` on ``port`` (default chat_port)."""
    load_logins(settings)  # a plain password or a malformed entry stops here, before anything starts
    app_file = importlib.util.find_spec("ray_app.chat.app").origin  # found, not imported: importing starts it
    root = settings.home / "chat"
    root.mkdir(parents=True, exist_ok=True)
    port = port or settings.chat_port
    env = {
        "LLMOPS_HOME": str(settings.home),
        "LLMOPS_CHAT_PORT": str(port),
        "CHAINLIT_AUTH_SECRET": credentials.chat_secret(settings),
        # Chainlit writes .chainlit/ (config, translations) and .files/ under its app root, not the cwd.
        "CHAINLIT_APP_ROOT": str(root),
    }
    if settings.chat_database_url:
        env["LLMOPS_CHAT_DATABASE_URL"] = str(settings.chat_database_url)
    if settings.chat_serve_url:
        env["LLMOPS_CHAT_SERVE_URL"] = str(settings.chat_serve_url)
    chainlit = Path(sys.executable).with_name("chainlit")
    argv = [str(chainlit), "run", str(app_file), "--headless", "--host", settings.bind_host, "--port", str(port)]
    return argv, {**os.environ, **env}
