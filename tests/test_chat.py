"""The chat in a real headless Chromium: Chainlit (`llmops chat`) streaming from a real Serve app,
history and feedback in SQLite and in PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, venv_bin, wait_for_port
from tiny_model import build_tiny_chat_model

from ray_app.chat.auth import hash_password, verify_password
from ray_app.chat.feedback import read_feedback
from ray_app.chat.schema import upgrade_schema
from ray_app.settings import Settings
from ray_app.stack import stop_process_group

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
USER, PASSWORD = "alice", "correct horse battery staple"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def test_password_hashes_verify_only_the_right_password():
    stored = hash_password(PASSWORD, iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and PASSWORD not in stored
    assert verify_password(PASSWORD, stored)
    assert not verify_password("wrong", stored)
    assert not verify_password(PASSWORD, "pbkdf2_sha256$broken")


def test_schema_upgrade_creates_tables_then_adds_only_missing_columns(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    assert "created table feedbacks" in upgrade_schema(url)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'chat.db'}")
    with engine.begin() as connection:  # an older schema: steps without a column Chainlit now writes
        connection.execute(sa.text('ALTER TABLE steps DROP COLUMN "autoCollapse"'))
    engine.dispose()
    assert upgrade_schema(url) == ["added column steps.autoCollapse"]
    assert upgrade_schema(url) == []


# --- services --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_serve(ray_cluster: Settings, serve_http_port: int, tmp_path_factory) -> Iterator[Settings]:
    """The Serve app (serve_configs/local.yaml) with a tiny model, deployed like `llmops serve` does."""
    from ray_app.serving.rollout import deploy, load_serve_config, shutdown

    settings = ray_cluster.model_copy(update={"serve_port": serve_http_port})
    model = build_tiny_chat_model(tmp_path_factory.mktemp("chat-model") / "tiny-chat-model")
    config = load_serve_config(REPO / "serve_configs" / "local.yaml", settings, model=str(model))
    config["applications"][0]["args"].update({"max_tokens_limit": 128, "default_max_tokens": 32})
    deploy(config, settings, wait_s=240)
    try:
        yield settings
    finally:
        shutdown(settings)


@contextmanager
def running_chat(serve: Settings, database_url: str, home: Path, serve_url: str | None = None) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "LLMOPS_HOME": str(home),
        "LLMOPS_CHAT_DATABASE_URL": database_url,
        "LLMOPS_CHAT_SERVE_URL": serve_url or f"{serve.serve_url}/v1",
        "LLMOPS_CHAT_API_KEY": serve.serve_api_keys()[0],
        "LLMOPS_CHAT_USERS": f"{USER}:{hash_password(PASSWORD, iterations=1000)}",
        "LLMOPS_CHAT_TIMEOUT_S": "20",
    }
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / f"chat-{port}.log", "ab")
    proc = subprocess.Popen([venv_bin("llmops"), "chat", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for_port(port, timeout=90, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc.pid, timeout_s=10)
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def login(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.fill("#email", USER)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#chat-input", timeout=30_000)
    return page


def send(page, text: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # The input re-renders (and empties) when the chat-start messages arrive: fill until it sticks.
    for _attempt in range(10):
        page.fill("#chat-input", text)
        try:
            page.wait_for_selector("#chat-submit:not([disabled])", timeout=2_000)
            page.click("#chat-submit", timeout=2_000)
            return
        except PlaywrightTimeout:
            time.sleep(0.5)
    raise AssertionError(f"could not send {text!r}: the send button stayed disabled")


ANSWERS = '[data-step-type="assistant_message"] .message-content'


def last_answer(page, containing: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        texts = page.locator(ANSWERS).all_inner_texts()
        if texts and containing in texts[-1]:
            return texts[-1]
        time.sleep(0.3)
    raise AssertionError(f"no answer containing {containing!r}; page shows: {page.locator('body').inner_text()[-800:]}")


# --- the browser tests, on SQLite and on PostgreSQL ---------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    postgres = request.getfixturevalue("postgres")
    name = f"chat_{int(time.time() * 1000) % 10**9}"
    return postgres.url(postgres.create_database(name), driver="asyncpg")


def test_login_stream_an_answer_rate_it_and_find_the_thread_after_a_restart(
    browser, chat_serve, database_url, tmp_path
):
    ARTIFACTS.mkdir(exist_ok=True)
    backend = database_url.split("+")[0]
    with running_chat(chat_serve, database_url, tmp_path / "home") as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#email", timeout=30_000)
        assert page.locator("#chat-input").count() == 0  # no login, no chat
        page.close()

        page = login(browser, url)
        send(page, "What is the capital of France?")
        answer = last_answer(page, "answered by")
        assert len(answer.split("answered by")[0].strip()) > 0
        page.screenshot(path=str(ARTIFACTS / f"chat-{backend}.png"), full_page=True)

        page.locator(".positive-feedback-off").last.click()
        page.locator("[role=dialog] textarea").fill("short and right")
        page.click("#submit-feedback")
        deadline = time.monotonic() + 20
        while not (rows := read_feedback(database_url)) and time.monotonic() < deadline:
            time.sleep(0.5)
        [row] = rows
        assert row.value == 1 and row.comment == "short and right" and row.user == USER
        assert row.model_version == "tiny-chat-model"
        assert row.conversation == [{"role": "user", "content": "What is the capital of France?"}]
        assert row.answer and "answered by" not in row.answer
        page.close()

    with running_chat(chat_serve, database_url, tmp_path / "home") as url:  # a restarted chat server
        page = login(browser, url)
        page.get_by_text("What is the capital of France?").first.click(timeout=30_000)
        last_answer(page, "answered by")
        page.close()


def test_with_serve_unreachable_the_page_shows_an_error_and_no_traceback(browser, chat_serve, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with running_chat(chat_serve, f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", tmp_path / "home", dead) as url:
        page = login(browser, url)
        send(page, "Hello?")
        # The chat start already says the server is unreachable; the answer's error brings a Retry button.
        page.get_by_role("button", name="Retry").last.wait_for(timeout=60_000)
        body = page.locator("body").inner_text()
        assert "is not answering" in body and "Traceback" not in body and dead.removesuffix("/v1") in body
        page.close()
