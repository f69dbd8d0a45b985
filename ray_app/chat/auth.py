"""Chat logins: PBKDF2-SHA256 hashes only, the same cost for unknown users, and a failure throttle.

- :func:`hash_password` makes the ``user:pbkdf2_sha256$...`` entries of LLMOPS_CHAT_USERS
  (`llmops chat-passwd`); :func:`load_logins` refuses an entry that is a plain password.
- :class:`Logins` checks a password in constant time, and an unknown user costs one hash at
  the same iteration count as a known one, so timing does not tell which names exist.
- :class:`LoginThrottle` counts failures per user name and per client address in a sliding
  window; past the limit, logins answer 429 until the oldest failure leaves the window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable

from ray_app.credentials import generated_secret
from ray_app.settings import Settings, SettingsError

SCHEME = "pbkdf2_sha256"
ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
ADMIN = "admin"


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64), safe to keep in LLMOPS_CHAT_USERS."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    encode = base64.b64encode
    return f"{SCHEME}${iterations}${encode(salt).decode()}${encode(digest).decode()}"


def _parse(stored: str) -> tuple[int, bytes, bytes] | None:
    """(iterations, salt, digest) of a hash from :func:`hash_password`; None for anything else."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME or int(iterations) < 1:
            return None
        return int(iterations), base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    except ValueError:
        return None


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``, a hash from :func:`hash_password` (a plain text never matches)."""
    parsed = _parse(stored)
    if parsed is None:
        return False
    iterations, salt, expected = parsed
    actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.compare_digest(actual, expected)


class Logins:
    """user -> password hash; :meth:`check` costs one hash whether or not the user exists."""

    def __init__(self, hashes: dict[str, str]):
        self.hashes = dict(hashes)
        self._decoy: str | None = None

    def _decoy_hash(self) -> str:
        """A random hash at the iteration count the real ones use: what an unknown name is checked against."""
        if self._decoy is None:
            iterations = max((_parse(stored) or (ITERATIONS,))[0] for stored in self.hashes.values())
            self._decoy = hash_password(secrets.token_urlsafe(16), iterations)
        return self._decoy

    def __contains__(self, user: str) -> bool:
        return user in self.hashes

    @property
    def users(self) -> list[str]:
        return list(self.hashes)

    def check(self, user: str, password: str) -> bool:
        stored = self.hashes.get(user)
        matched = verify_password(password, stored if stored is not None else self._decoy_hash())
        return matched and stored is not None


def load_logins(settings: Settings) -> Logins:
    """The chat's logins from LLMOPS_CHAT_USERS (``user:pbkdf2_sha256$...`` entries, hashes only).

    Without any, user ``admin`` gets a password generated once into the stack dir (mode 0600),
    hashed here, so the chat is never open. Raises SettingsError naming a bad entry's user.
    """
    hashes: dict[str, str] = {}
    for entry in settings.chat_users:
        user, sep, stored = entry.get_secret_value().partition(":")
        user, stored = user.strip(), stored.strip()
        if not sep or not user or not stored:
            raise SettingsError(
                "invalid setting chat_users (LLMOPS_CHAT_USERS): expected user:pbkdf2_sha256$... entries"
            )
        if _parse(stored) is None:
            raise SettingsError(
                f"invalid setting chat_users (LLMOPS_CHAT_USERS): the entry of user {user!r} is not a "
                f"{SCHEME} hash (plain passwords are refused); make one with `llmops chat-passwd {user}`"
            )
        hashes[user] = stored
    if not hashes:
        hashes[ADMIN] = hash_password(generated_secret(settings.chat_admin_password_path))
    return Logins(hashes)


class LoginThrottle:
    """Failed logins per key in a sliding window; :meth:`retry_after` > 0 means refuse (429)."""

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str) -> deque[float]:
        failures, horizon = self._failures[key], self.clock() - self.window_s
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures

    def retry_after(self, *keys: tuple[str, int]) -> float:
        """Seconds until a login may be tried again; ``keys`` are (key, limit) pairs; 0 when allowed."""
        wait = 0.0
        for key, limit in keys:
            failures = self._recent(key)
            if not failures:  # memory holds only failures inside the window, whatever names are tried
                del self._failures[key]
            elif len(failures) >= limit:
                wait = max(wait, failures[len(failures) - limit] + self.window_s - self.clock())
        return wait

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            self._recent(key).append(now)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
