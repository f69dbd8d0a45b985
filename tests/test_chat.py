"""The chat in a real headless Chromium: Chainlit (`llmops chat`) streaming from a real Serve app,
history and feedback in SQLite and in PostgreSQL."""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import draw_dashboard, free_port, remove_postgres, start_postgres, venv_bin, wait_for_port
from tiny_model import build_tiny_chat_model

from ray_app import monitoring
from ray_app.chat.auth import LoginThrottle, hash_password, verify_password
from ray_app.chat.feedback import read_feedback
from ray_app.chat.schema import upgrade_schema
from ray_app.settings import Settings
from ray_app.stack import stop_process_group

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
USER, PASSWORD = "alice", "correct horse battery staple"
OTHER, OTHER_PASSWORD = "bob", "tr0ub4dor&3"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def test_password_hashes_verify_only_the_right_password():
    stored = hash_password(PASSWORD, iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and PASSWORD not in stored
    assert verify_password(PASSWORD, stored)
    assert not verify_password("wrong", stored)
    assert not verify_password(PASSWORD, "pbkdf2_sha256$broken")
    assert not verify_password(PASSWORD, PASSWORD), "a plain text is never a stored password"


def test_login_throttle_counts_failures_per_key_in_a_sliding_window():
    now = [0.0]
    throttle = LoginThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    for second in (0, 10, 20):
        now[0] = second
        assert throttle.retry_after(("user:a", 3)) == 0
        throttle.failed("user:a", "ip:x")
    assert throttle.retry_after(("user:a", 3)) == 40  # the first failure leaves the window at 60
    assert throttle.retry_after(("user:b", 3), ("ip:x", 30)) == 0
    now[0] = 61
    assert throttle.retry_after(("user:a", 3)) == 0
    throttle.failed("user:a")
    throttle.succeeded("user:a")
    assert throttle.retry_after(("user:a", 1)) == 0


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
def chat_serve_config(ray_cluster: Settings, serve_http_port: int, tmp_path_factory) -> dict:
    """serve_configs/local.yaml with a tiny model, as the chat tests deploy it."""
    from ray_app.serving.rollout import load_serve_config

    settings = ray_cluster.model_copy(update={"serve_port": serve_http_port})
    model = build_tiny_chat_model(tmp_path_factory.mktemp("chat-model") / "tiny-chat-model")
    config = load_serve_config(REPO / "serve_configs" / "local.yaml", settings, model=str(model))
    # No queue past the running batch of 8: a ninth request gets 503 + Retry-After (the busy test).
    config["applications"][0]["args"].update(
        {"max_tokens_limit": 128, "default_max_tokens": 32, "max_queued_requests": 0, "retry_after_s": 1}
    )
    return config


@pytest.fixture(scope="module")
def chat_serve(ray_cluster: Settings, serve_http_port: int, chat_serve_config: dict) -> Iterator[Settings]:
    """The Serve app (serve_configs/local.yaml) with a tiny model, deployed like `llmops serve` does."""
    from ray_app.serving.rollout import deploy, shutdown

    settings = ray_cluster.model_copy(update={"serve_port": serve_http_port})
    deploy(chat_serve_config, settings, wait_s=240)
    try:
        yield settings
    finally:
        shutdown(settings)


def chat_users(iterations: int = 1000) -> str:
    return f"{USER}:{hash_password(PASSWORD, 1000)},{OTHER}:{hash_password(OTHER_PASSWORD, iterations)}"


@contextmanager
def running_chat(serve: Settings, database_url: str, home: Path, serve_url: str | None = None,
                 users: str | None = None, port: int | None = None, **extra_env: str) -> Iterator[str]:  # fmt: skip
    port = port or free_port()
    env = {
        **extra_env,
        **os.environ,
        "LLMOPS_HOME": str(home),
        "LLMOPS_CHAT_DATABASE_URL": database_url,
        "LLMOPS_CHAT_SERVE_URL": serve_url or f"{serve.serve_url}/v1",
        "LLMOPS_CHAT_API_KEY": serve.serve_api_keys()[0],
        "LLMOPS_CHAT_USERS": users or chat_users(),
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


def login(browser, url: str, user: str = USER, password: str = PASSWORD):
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()  # its own cookies
    page.goto(url)
    page.fill("#email", user)
    page.fill("#password", password)
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
    browser, chat_serve, database_url, tmp_path, prometheus
):
    ARTIFACTS.mkdir(exist_ok=True)
    backend = database_url.split("+")[0]
    # On the port the stack's Prometheus scrapes, with the token it shows.
    scraped = {"port": chat_serve.chat_port, "LLMOPS_METRICS_TOKEN": monitoring.metrics_token(prometheus)}
    with running_chat(chat_serve, database_url, tmp_path / "home", **scraped) as url:
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
        another_user_cannot_touch_the_thread(browser, url, database_url, row, page)
        page.context.close()
        the_rating_reaches_prometheus(prometheus, url, "tiny-chat-model")

    with running_chat(chat_serve, database_url, tmp_path / "home") as url:  # a restarted chat server
        page = login(browser, url)
        page.get_by_text("What is the capital of France?").first.click(timeout=30_000)
        last_answer(page, "answered by")
        page.context.close()


def the_rating_reaches_prometheus(settings: Settings, url: str, version: str) -> None:
    """The thumbs-down with a correction (the last state of the rating) is what Prometheus holds for the version."""
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    wanted = {
        "down": f'llmops_feedback_total{{model_version="{version}", rating="down"}}',
        "corrections": f'llmops_feedback_corrections_total{{model_version="{version}"}}',
        "database": 'llmops_chat_database_up{job="chat"}',
    }
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        seen = {name: [float(r["value"][1]) for r in monitoring.query(settings, q)] for name, q in wanted.items()}
        up = monitoring.query(settings, f'llmops_feedback_total{{model_version="{version}", rating="up"}}')
        if seen == {"down": [1.0], "corrections": [1.0], "database": [1.0]} and not up:
            assert draw_dashboard(settings, "feedback-loop", minutes=10) >= 4
            return
        time.sleep(1)
    raise AssertionError(f"Prometheus holds {seen} (and up={up}) for {version}")


def feedback_rows(database_url: str) -> list[tuple]:
    import sqlalchemy as sa

    from ray_app.chat.schema import feedbacks, sync_url

    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as connection:
            columns = (feedbacks.c.id, feedbacks.c.forId, feedbacks.c.threadId, feedbacks.c.value, feedbacks.c.comment)
            return [tuple(row) for row in connection.execute(sa.select(*columns).order_by(feedbacks.c.id))]
    finally:
        engine.dispose()


def another_user_cannot_touch_the_thread(browser, url: str, database_url: str, row, owner_page) -> None:
    """A second user, logged in in their own browser context, calls the chat's API on the first's thread."""
    [(feedback_id, for_id, thread_id, _value, _comment)] = before = feedback_rows(database_url)
    intruder = login(browser, url, OTHER, OTHER_PASSWORD)
    api = intruder.request
    assert api.get(f"{url}/project/thread/{thread_id}").status == 403
    planted = {"forId": for_id, "threadId": thread_id, "value": 0, "comment": "correction: planted"}
    for feedback in (planted, {**planted, "id": feedback_id}, {**planted, "threadId": "elsewhere"}):
        response = api.put(f"{url}/feedback", data={"feedback": feedback, "sessionId": "s"})
        assert response.status == 403, (feedback, response.status, response.text())
    assert api.delete(f"{url}/feedback", data={"feedbackId": feedback_id}).status == 403
    listed = api.post(f"{url}/project/threads", data={"pagination": {"first": 20}, "filter": {}})
    assert listed.ok and thread_id not in listed.text()
    assert feedback_rows(database_url) == before, "nothing the second user sent was stored"
    intruder.context.close()

    # The author still rates their own answer through the same (guarded) route, and only on its thread.
    mine = {"id": feedback_id, "forId": for_id, "threadId": "elsewhere", "value": 0, "comment": "correction: Paris."}
    assert owner_page.request.put(f"{url}/feedback", data={"feedback": mine, "sessionId": "s"}).ok
    assert feedback_rows(database_url) == [(feedback_id, for_id, thread_id, 0, "correction: Paris.")]
    assert read_feedback(database_url)[0].step_id == row.step_id


def test_with_serve_unreachable_the_page_shows_an_error_and_no_traceback(browser, chat_serve, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with running_chat(chat_serve, f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", tmp_path / "home", dead) as url:
        page = login(browser, url)
        send(page, "Hello?")
        # The chat start already says the server is unreachable; the answer's error brings a Retry button.
        page.get_by_role("button", name="Retry").last.wait_for(timeout=60_000)
        body = page.locator("body").inner_text()
        assert "is not answering" in body and "Traceback" not in body and dead.removesuffix("/v1") in body
        page.context.close()


def test_with_the_history_database_down_the_question_is_kept_and_retry_saves_the_turn(browser, chat_serve, tmp_path):
    """A PostgreSQL of its own stops mid-conversation: the page says the message was not sent,
    naming the database; once it is back, Retry answers and the turn is in the database."""
    import sqlalchemy as sa

    from ray_app.chat.schema import steps, sync_url

    server = start_postgres()
    try:
        database_url = server.url(server.create_database("chat"), driver="asyncpg")
        with running_chat(chat_serve, database_url, tmp_path / "home") as url:
            page = login(browser, url)
            send(page, "First question?")
            last_answer(page, "answered by")
            server.stop()
            send(page, "Second question, database down?")
            page.get_by_role("button", name="Retry").last.wait_for(timeout=60_000)
            body = page.locator("body").inner_text()
            assert "Your message was not sent" in body and f"127.0.0.1:{server.port}/chat" in body, body[-800:]
            answers = lambda: [t for t in page.locator(ANSWERS).all_inner_texts() if "answered by" in t]  # noqa: E731
            assert "Traceback" not in body and len(answers()) == 1
            server.start()
            page.get_by_role("button", name="Retry").last.click()
            _wait(lambda: len(answers()) == 2, 60, "the answer after Retry")

            def saved() -> list[tuple[str, str]]:
                engine = sa.create_engine(sync_url(database_url))
                try:
                    with engine.connect() as connection:
                        query = sa.select(steps.c.type, steps.c.output, steps.c.threadId).order_by(steps.c.createdAt)
                        return [tuple(row) for row in connection.execute(query)]
                finally:
                    engine.dispose()

            _wait(lambda: len([r for r in saved() if r[0] == "assistant_message"]) == 2, 30, "the turn saved")
            rows = saved()
            assert ("user_message", "Second question, database down?") in [r[:2] for r in rows], rows
            assert len({r[2] for r in rows}) == 1, "one thread"
            page.context.close()
    finally:
        remove_postgres(server)


def test_a_busy_server_makes_the_chat_say_so_and_retry_until_it_answers(browser, chat_serve, tmp_path):
    """Serve at capacity answers 503 + Retry-After: the chat shows "busy, retrying" instead of
    failing or hanging, and the answer comes once the load is gone."""
    import httpx

    api = f"{chat_serve.serve_url}/v1/chat/completions"
    load = {"model": "tiny-chat-model", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 128}
    stop, shed = threading.Event(), []

    def occupy() -> None:  # 12 clients in a loop keep the 8 batch slots full
        with httpx.Client(headers={"Authorization": f"Bearer {chat_serve.serve_api_keys()[0]}"}, timeout=60) as http:
            while not stop.is_set():
                if http.post(api, json=load).status_code == 503:
                    shed.append(1)
                    time.sleep(0.02)

    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    with running_chat(chat_serve, database, tmp_path / "home") as url:
        page = login(browser, url)
        clients = [threading.Thread(target=occupy, daemon=True) for _ in range(12)]
        for client in clients:
            client.start()
        try:
            _wait(lambda: len(shed) > 5, 30, "the server to shed load")
            for attempt in range(3):  # the chat's first try may find a slot the moment one frees: ask again
                send(page, f"Are you busy? ({attempt})")
                if _seen(page, "The model is busy: retrying in", 15):
                    break
            else:
                raise AssertionError("the chat never said the server was busy")
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=60)
        last_answer(page, "answered by", timeout_s=60)
        body = page.locator("body").inner_text()
        assert "Traceback" not in body and "refused" not in body
        assert not _seen(page, "The model is busy", 2), "the busy line goes once the answer comes"
        page.context.close()


def _seen(page, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in page.locator("body").inner_text():
            return True
        time.sleep(0.2)
    return False


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


def test_logins_take_hashes_only_cost_the_same_for_unknown_names_are_throttled_and_same_origin(chat_serve, tmp_path):
    import statistics

    import httpx

    plain = {**os.environ, "LLMOPS_HOME": str(tmp_path / "plain"), "LLMOPS_CHAT_USERS": f"{chat_users()},carol:hunter2"}
    refused = subprocess.run([venv_bin("llmops"), "chat", "--port", str(free_port())], env=plain,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 1 and "'carol'" in refused.stderr and "plain passwords" in refused.stderr
    assert "hunter2" not in refused.stdout + refused.stderr

    # bob's hash is costly (~0.1 s here): an unknown name answering at once would show it does not exist.
    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    with running_chat(chat_serve, database, tmp_path / "home", users=chat_users(iterations=200_000)) as url:
        http = httpx.Client(base_url=url, timeout=30)

        def attempt(user: str, password: str, origin: str | None = None) -> httpx.Response:
            headers = {"Origin": origin} if origin else {}
            return http.post("/login", data={"username": user, "password": password}, headers=headers)

        timings: dict[str, list[float]] = {"unknown": [], "wrong": []}
        for _ in range(3):
            for kind, user in (("unknown", "mallory"), ("wrong", OTHER)):
                started = time.perf_counter()
                assert attempt(user, "not-it").status_code == 401
                timings[kind].append(time.perf_counter() - started)
        unknown, wrong = (statistics.median(timings[kind]) for kind in ("unknown", "wrong"))
        assert 0.5 < unknown / wrong < 2.0, timings

        statuses = [attempt(USER, f"guess-{i}").status_code for i in range(10)]
        assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses) == {401, 429}, statuses
        limited = attempt(USER, PASSWORD)  # locked out for the window, even with the right password
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0, limited.headers
        assert "too many failed logins" in limited.json()["detail"]
        assert attempt(OTHER, OTHER_PASSWORD).status_code == 200  # another name is not locked out

        assert attempt(OTHER, OTHER_PASSWORD, origin=url).status_code == 200
        assert attempt(OTHER, OTHER_PASSWORD, origin="http://evil.example").status_code == 403
        preflight = http.options("/feedback", headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "PUT"})  # fmt: skip
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers


GUARD_PIN = """
import json
from chainlit.server import app, router
from fastapi.routing import APIRoute
from ray_app.chat import guard
from ray_app.settings import load_settings

def served(routes):
    return {(method, route.path): route.endpoint.__module__
            for route in routes if isinstance(route, APIRoute) for method in route.methods}

chainlit_routes = served(router.routes)
guard.install(app, load_settings())
ahead = []  # the app's own routes before the first included router or mount: matched first
for route in app.router.routes:
    if not isinstance(route, APIRoute):
        break
    ahead.append(route)
print(json.dumps({"chainlit": [chainlit_routes.get(key) for key in guard.SHADOWED],
                  "first": [served(ahead).get(key) for key in guard.SHADOWED]}))
"""


def test_scaled_to_zero_the_chat_says_the_model_is_waking_up_and_the_answer_comes(
    browser, chat_serve, chat_serve_config, tmp_path
):
    """min_replicas: 0: idle, the model deployment scales to zero; a question wakes it (Serve holds the
    request until a replica is up) and the chat says so meanwhile instead of spinning or failing.
    Runs after the other tests on chat_serve: it leaves the app at zero."""

    from ray_app.serving.rollout import deploy

    config = copy.deepcopy(chat_serve_config)
    [server] = [d for d in config["applications"][0]["deployments"] if d["name"] == "ChatServer"]
    server["autoscaling_config"].update(
        {"min_replicas": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2, "metrics_interval_s": 0.5,
         "look_back_period_s": 1}
    )  # fmt: skip
    deploy(config, chat_serve, wait_s=240)
    key = {"Authorization": f"Bearer {chat_serve.serve_api_keys()[0]}"}
    replicas = f"{chat_serve.serve_url}/v1/replicas"
    assert httpx.get(replicas, timeout=10).status_code == 401, "an authenticated route like the rest of /v1"
    _wait(lambda: httpx.get(replicas, headers=key, timeout=10).json()["running"] == 0, 90, "zero replicas")
    assert httpx.get(replicas, headers=key, timeout=10).json()["waking_up"] is True

    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    with running_chat(chat_serve, database, tmp_path / "home", LLMOPS_CHAT_WAKE_NOTICE_S="0.5") as url:
        page = login(browser, url)
        asked = time.monotonic()
        send(page, "Are you awake?")
        assert _seen(page, "The model is waking up", 30), page.locator("body").inner_text()[-800:]
        last_answer(page, "answered by", timeout_s=120)
        cold_start_s = time.monotonic() - asked
        assert not _seen(page, "The model is waking up", 2), "the notice goes once the answer comes"
        body = page.locator("body").inner_text()
        assert "Traceback" not in body and "not answering" not in body
        page.context.close()
    print(f"cold start from zero replicas to an answer in the chat: {cold_start_s:.1f}s")  # timed in benchmarks/


def test_guard_shadows_the_chainlit_routes_it_replaces(tmp_path):
    """Pins the one module that reaches into Chainlit's server to the installed Chainlit."""
    import json

    env = {**os.environ, "CHAINLIT_APP_ROOT": str(tmp_path), "LLMOPS_HOME": str(tmp_path / "home")}
    done = subprocess.run([venv_bin("python"), "-c", GUARD_PIN], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    routes = json.loads(done.stdout.strip().splitlines()[-1])
    assert routes["chainlit"] == ["chainlit.server"] * 3, "Chainlit no longer serves a route the guard replaces"
    assert routes["first"] == ["ray_app.chat.guard"] * 3, routes
