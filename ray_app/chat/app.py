"""The Chainlit chat (`llmops chat`): answers stream from the Serve app's OpenAI API.

- Login: Chainlit password auth against LLMOPS_CHAT_USERS (pbkdf2 hashes only); without it,
  user `admin` with a generated password (`$LLMOPS_HOME/stack/chat_admin_password`). Failed
  logins are throttled (429), other origins refused, and feedback may only be written by the
  thread's author (`ray_app.chat.guard`).
- History: Chainlit's SQLAlchemy data layer on SQLite (default) or PostgreSQL; the schema is
  ours (`ray_app.chat.schema`) and is created/upgraded when the chat starts.
- Each answer records the model version that produced it (step metadata) and shows it
  under the answer; thumbs up/down + comment land in `feedbacks`, read back by
  `ray_app.chat.feedback` for retraining.
- When Serve is down or slow, the user gets a one-line error and a Retry button; when it is
  busy (503/429) the chat says so and retries with backoff (``BusyRetry``); when its model
  replicas scaled to zero, the chat says the model is waking up while it starts (``WakeNotice``).
- When the history database is down, the question is not sent: the user is told (naming the
  database) and keeps it for Retry; an answer that could not be saved gets "Retry saving"
  (``ray_app.chat.history``). Nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time

import chainlit as cl
import httpx
from chainlit.config import config as chainlit_config
from chainlit.data import get_data_layer
from chainlit.input_widget import Select, Slider, TextInput
from chainlit.server import app as chainlit_app
from openai import APIConnectionError, APIError, APIStatusError, APITimeoutError, AsyncOpenAI

from ray_app import credentials
from ray_app.chat import guard
from ray_app.chat.auth import load_logins
from ray_app.chat.feedback import ChatDatabaseError
from ray_app.chat.history import HistoryLayer
from ray_app.chat.metrics import metrics_router
from ray_app.chat.schema import upgrade_schema
from ray_app.monitoring import metrics_token
from ray_app.serving.routing import CONVERSATION_HEADER
from ray_app.settings import get_settings

SETTINGS = get_settings()
SERVE_URL = str(SETTINGS.chat_serve_url).rstrip("/")
API_KEY = SETTINGS.chat_api_key.get_secret_value() if SETTINGS.chat_api_key else credentials.serve_api_keys(SETTINGS)[0]
DEFAULT_SYSTEM_PROMPT = "You are a helpful, concise assistant."
FOOTER = re.compile(r"\n\n\*answered by [^*]+\*$")
# Without a tokenizer here, budget the history at ~3 characters per token (conservative for
# English); the server still checks exactly and we drop more turns if it says no.
CHARS_PER_TOKEN = 3

LOGINS = load_logins(SETTINGS)

upgrade_schema(str(SETTINGS.chat_database_url))
guard.install(chainlit_app, SETTINGS, root_path=chainlit_config.run.root_path or "")
# Prometheus's view of the feedback (before Chainlit's catch-all route, like the guard's routes)
chainlit_app.router.routes[0:0] = metrics_router(
    str(SETTINGS.chat_database_url), metrics_token(SETTINGS), root_path=chainlit_config.run.root_path or ""
).routes
# Retries are ours (BusyRetry): the user sees why they wait.
client = AsyncOpenAI(base_url=SERVE_URL, api_key=API_KEY, timeout=SETTINGS.chat_timeout_s, max_retries=0)
BUSY_STATUSES = (429, 503)
WAKING_UP_TEXT = "The model is waking up (it sleeps when nobody asks): your answer starts in a few seconds."
BUSY_FIRST_WAIT_S, BUSY_MAX_WAIT_S = 1.0, 15.0


@cl.data_layer
def data_layer() -> HistoryLayer:
    return HistoryLayer(conninfo=str(SETTINGS.chat_database_url))


@cl.password_auth_callback
async def login(username: str, password: str) -> cl.User | None:
    # PBKDF2 releases the GIL: hashing on a thread keeps the event loop (other users' streams) going.
    if await asyncio.to_thread(LOGINS.check, username, password):
        return cl.User(identifier=username, metadata={"provider": "credentials"})
    return None


@cl.set_starters
async def starters(_user: cl.User | None = None, _language: str | None = None) -> list[cl.Starter]:
    return [
        cl.Starter(label="What can you do?", message="What can you help me with?"),
        cl.Starter(label="Explain fine-tuning", message="Explain in two sentences what fine-tuning a model means."),
    ]


async def served_models() -> list[dict]:
    """The models Serve offers (``/v1/models``), or [] when it cannot be reached."""
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{SERVE_URL}/models", headers={"Authorization": f"Bearer {API_KEY}"})
            response.raise_for_status()
            return response.json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return []


async def start_session(history: list[dict[str, str]]) -> None:
    models = await served_models()
    cl.user_session.set("history", history)
    cl.user_session.set("models", {m["id"]: m for m in models})
    choices = list(cl.user_session.get("models")) or ["(model server unreachable)"]
    chat_settings = await cl.ChatSettings(
        [
            Select(id="model", label="Model", values=choices, initial_index=0),
            TextInput(id="system_prompt", label="System prompt", initial=DEFAULT_SYSTEM_PROMPT),
            Slider(id="temperature", label="Temperature", initial=0.7, min=0, max=2, step=0.1),
            Slider(id="max_tokens", label="Max tokens", initial=256, min=16, max=1024, step=16),
        ]
    ).send()
    cl.user_session.set("chat_settings", chat_settings)
    if not models:
        error = cl.Message(content=unreachable_text())
        error.is_error = True
        await error.send()


@cl.on_chat_start
async def on_chat_start() -> None:
    await start_session([])


@cl.on_chat_resume
async def on_chat_resume(thread: cl.types.ThreadDict) -> None:
    history = []
    for step in thread.get("steps", []):
        if step.get("type") == "user_message":
            history.append({"role": "user", "content": step.get("output") or ""})
        elif step.get("type") == "assistant_message" and not step.get("isError"):
            history.append({"role": "assistant", "content": FOOTER.sub("", step.get("output") or "")})
    await start_session(history)


@cl.on_settings_update
async def on_settings_update(chat_settings: dict) -> None:
    cl.user_session.set("chat_settings", chat_settings)


def unreachable_text(detail: str = "") -> str:
    reason = f" ({detail})" if detail else ""
    return f"The model server at {SERVE_URL} is not answering{reason}. Press Retry, or send your message again."


def trimmed(messages: list[dict[str, str]], budget_tokens: int, drop: int = 0) -> list[dict[str, str]]:
    """The system prompt plus the newest turns that fit ``budget_tokens`` (always the last message)."""
    system, turns = messages[:1], messages[1:]
    turns = turns[drop:] if drop < len(turns) else turns[-1:]
    budget = budget_tokens * CHARS_PER_TOKEN - len(system[0]["content"])
    kept: list[dict[str, str]] = []
    for message in reversed(turns):
        if kept and len(message["content"]) > budget:
            break
        kept.insert(0, message)
        budget -= len(message["content"])
    return system + kept


async def answer(text: str, question: dict | None = None) -> None:
    """Stream the answer to ``text`` (appended to the history) into a new message.

    ``question`` is the user's message as Chainlit stores it: saved before the model is asked
    (if the database is down the user is told and keeps it for Retry), and again with the answer.
    """
    if question is not None and not await saved([question], text, question):
        return
    chat_settings = cl.user_session.get("chat_settings") or {}
    models = cl.user_session.get("models") or {}
    if not models:  # Serve may be back since the chat started
        models = {m["id"]: m for m in await served_models()}
        cl.user_session.set("models", models)
    if not models:
        await retryable_error(text, unreachable_text(), question)
        return
    model = chat_settings.get("model") if chat_settings.get("model") in models else next(iter(models))
    max_tokens = int(chat_settings.get("max_tokens", 256))
    context = int(models[model].get("max_model_len") or 2048)
    history = cl.user_session.get("history") or []
    system = {"role": "system", "content": chat_settings.get("system_prompt") or DEFAULT_SYSTEM_PROMPT}
    messages = [system, *history, {"role": "user", "content": text}]
    max_tokens = min(max_tokens, max(16, context // 2), int(models[model].get("max_tokens_limit") or max_tokens))

    msg = cl.Message(content="", author="assistant")
    request = {"model": model, "temperature": float(chat_settings.get("temperature", 0.7)), "max_tokens": max_tokens,
               # One conversation stays on one version while a canary runs (ray_app.serving.routing).
               "extra_headers": {CONVERSATION_HEADER: cl.context.session.thread_id}}  # fmt: skip
    answered, version = await ask(msg, text, request, lambda drop: trimmed(messages, context - max_tokens, drop),
                                  question)  # fmt: skip
    if not answered:
        return
    answer_text = msg.content
    cl.user_session.set("history", [*history, {"role": "user", "content": text},
                                    {"role": "assistant", "content": answer_text}])  # fmt: skip
    msg.metadata = {"model_version": version, "model": model, "answer": answer_text}
    msg.content = f"{answer_text}\n\n*answered by {version or model}*"
    await msg.send()
    await saved([msg.to_dict()], text, None)  # the question was saved before the model was asked


async def ask(
    msg: cl.Message, text: str, request: dict, conversation, question: dict | None
) -> tuple[bool, str | None]:
    """Stream the answer into ``msg``: fewer turns while the server says the prompt is too long,
    waiting while it is busy. Returns (answered, model version); on failure the user was told."""
    busy = BusyRetry(SETTINGS.chat_busy_retry_s)
    drop = 0
    try:
        while True:
            try:
                return True, await stream_into(msg, {**request, "messages": conversation(drop)})
            except APIStatusError as exc:
                too_long = exc.status_code == 400 and "context" in str(exc.message) and not msg.content
                if too_long and conversation(drop + 2) != conversation(drop):
                    drop += 2  # our estimate was off: drop the oldest turn and ask again
                    continue
                if exc.status_code in BUSY_STATUSES and not msg.content and await busy.wait(exc):
                    continue  # Serve shed load: it said when to come back
                await retryable_error(text, f"The model server refused the request: {_error_message(exc)}", question)
            except (APIConnectionError, APITimeoutError) as exc:
                await cut_off(msg, "the model server stopped responding")
                await retryable_error(text, unreachable_text(exc.__class__.__name__), question)
            except APIError as exc:  # an error event in the stream (e.g. the request's deadline passed)
                await cut_off(msg, str(exc.message))
                await retryable_error(text, f"The model server could not finish the answer: {exc.message}", question)
            return False, None
    finally:
        await busy.done()


async def cut_off(msg: cl.Message, why: str) -> None:
    if msg.content:
        await msg.stream_token(f"\n\n[the answer was cut off: {why}]")
        await msg.send()


async def stream_into(msg: cl.Message, request: dict) -> str | None:
    """Stream one answer into ``msg``; returns the model version that wrote it."""
    version = None
    waking = WakeNotice(SETTINGS.chat_wake_notice_s)
    try:
        stream = await client.chat.completions.create(stream=True, **request)
        async for chunk in stream:
            version = chunk.system_fingerprint or version
            if chunk.choices and chunk.choices[0].delta.content:
                await waking.done()
                await msg.stream_token(chunk.choices[0].delta.content)
    finally:
        await waking.done()
    return version


class WakeNotice:
    """No token within ``after_s``: ask Serve (``/v1/replicas``) whether any model replica is up. If
    none is (scaled to zero while idle, ``min_replicas: 0``), say the model is waking up, until
    the first token arrives: the request itself is what wakes it, so it keeps waiting."""

    def __init__(self, after_s: float):
        self.notice: cl.Message | None = None
        self._task: asyncio.Task | None = asyncio.create_task(self._watch(after_s))

    async def _watch(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        if await model_waking_up():
            self.notice = cl.Message(content=WAKING_UP_TEXT, author="system")
            await self.notice.send()

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.notice is not None:
            await self.notice.remove()
            self.notice = None


async def model_waking_up() -> bool:
    """True when Serve says no model replica is running; False when it says some are, or cannot say."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"{SERVE_URL}/replicas", headers={"Authorization": f"Bearer {API_KEY}"})
            response.raise_for_status()
            return bool(response.json()["waking_up"])
    except (httpx.HTTPError, KeyError, ValueError):
        return False


class BusyRetry:
    """While Serve answers 503/429, wait (its Retry-After, else exponential backoff with jitter) and
    say so in one line that updates, for up to ``budget_s``; then give up (the user gets Retry)."""

    def __init__(self, budget_s: float):
        self.budget_s, self.started, self.attempt = budget_s, time.monotonic(), 0
        self.notice: cl.Message | None = None

    async def wait(self, exc: APIStatusError) -> bool:
        """Wait before the next try; False when the budget is spent."""
        backoff = min(BUSY_MAX_WAIT_S, BUSY_FIRST_WAIT_S * 2**self.attempt) * random.uniform(0.8, 1.2)  # noqa: S311 (jitter)
        delay = max(_retry_after(exc), backoff)
        if time.monotonic() + delay - self.started > self.budget_s:
            return False
        self.attempt += 1
        text = f"The model is busy: retrying in {delay:.0f} s (attempt {self.attempt})."
        if self.notice is None:
            self.notice = cl.Message(content=text, author="system")
            await self.notice.send()
        else:
            self.notice.content = text
            await self.notice.update()
        await asyncio.sleep(delay)
        return True

    async def done(self) -> None:
        if self.notice is not None:
            await self.notice.remove()
            self.notice = None


def _retry_after(exc: APIStatusError) -> float:
    try:
        return min(BUSY_MAX_WAIT_S, float(exc.response.headers.get("retry-after", 0)))
    except ValueError:  # an HTTP date: not what Serve sends
        return 0.0


def _error_message(exc: APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str((body.get("error") or body).get("message") or exc.message)


async def retryable_error(text: str, message: str, question: dict | None = None) -> None:
    """An error line in the chat with a Retry button that asks the same question again."""
    payload = {"text": text, "question": question}
    error = cl.Message(content=message, actions=[cl.Action(name="retry", payload=payload, label="Retry")])
    error.is_error = True
    await error.send()


async def saved(steps: list[dict], text: str, question: dict | None) -> bool:
    """Store ``steps`` in the chat history now; if the database is down, say so and offer to retry.

    With ``question`` (nothing answered yet) Retry asks again; without, Retry saves the steps.
    """
    layer = get_data_layer()
    if not isinstance(layer, HistoryLayer):
        return True
    user = cl.user_session.get("user")
    try:
        await layer.save_steps(steps, getattr(user, "id", None))
    except ChatDatabaseError as exc:
        if question is not None:
            await retryable_error(text, f"Your message was not sent: {exc}. It is kept here: press Retry.", question)
        else:
            retry = cl.Action(name="save", payload={"steps": steps}, label="Retry saving")
            error = cl.Message(content=f"This answer was not saved: {exc}. Press Retry saving.", actions=[retry])
            error.is_error = True
            await error.send()
        return False
    return True


@cl.on_message
async def on_message(message: cl.Message) -> None:
    await answer(message.content, message.to_dict())


@cl.action_callback("retry")
async def on_retry(action: cl.Action) -> None:
    await answer(action.payload["text"], action.payload.get("question"))


@cl.action_callback("save")
async def on_save(action: cl.Action) -> None:
    steps = action.payload["steps"]
    if await saved(steps, "", None):
        await cl.Message(content="Saved.", author="system").send()
