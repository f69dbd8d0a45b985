"""The chat's SQL schema: the tables Chainlit's SQLAlchemy data layer reads and writes.

Chainlit creates no tables itself, and silently saves nothing when a column it writes is
missing (it only logs a warning). So the project owns the schema: :func:`upgrade_schema`
creates missing tables and adds missing columns, and runs on every chat start (and as
`llmops chat --upgrade-db`). SQLite and PostgreSQL from the same definition.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

# Chainlit stores JSON as text it dumps itself; PostgreSQL gets JSONB (asyncpg encodes text into it).
_JSON = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
_TAGS = sa.Text().with_variant(postgresql.ARRAY(sa.Text()), "postgresql")


def _id(name: str = "id", *args, **kwargs) -> sa.Column:
    return sa.Column(name, sa.Text, *args, **kwargs)


users = sa.Table(
    "users",
    metadata,
    _id(primary_key=True),
    sa.Column("identifier", sa.Text, nullable=False, unique=True),
    sa.Column("metadata", _JSON, nullable=False),
    sa.Column("createdAt", sa.Text),
)

threads = sa.Table(
    "threads",
    metadata,
    _id(primary_key=True),
    sa.Column("createdAt", sa.Text),
    sa.Column("name", sa.Text),
    _id("userId", sa.ForeignKey("users.id", ondelete="CASCADE")),
    sa.Column("userIdentifier", sa.Text),
    sa.Column("tags", _TAGS),
    sa.Column("metadata", _JSON),
)

steps = sa.Table(
    "steps",
    metadata,
    _id(primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    _id("threadId", sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    _id("parentId"),
    sa.Column("streaming", sa.Boolean, nullable=False),
    sa.Column("waitForAnswer", sa.Boolean),
    sa.Column("isError", sa.Boolean),
    sa.Column("metadata", _JSON),
    sa.Column("tags", _TAGS),
    sa.Column("input", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("createdAt", sa.Text),
    sa.Column("command", sa.Text),
    sa.Column("start", sa.Text),
    sa.Column("end", sa.Text),
    sa.Column("generation", _JSON),
    sa.Column("showInput", sa.Text),
    sa.Column("language", sa.Text),
    sa.Column("indent", sa.Integer),
    sa.Column("defaultOpen", sa.Boolean),
    sa.Column("autoCollapse", sa.Boolean),
    sa.Column("modes", _JSON),
    sa.Index("ix_steps_thread", "threadId"),
)

elements = sa.Table(
    "elements",
    metadata,
    _id(primary_key=True),
    _id("threadId", sa.ForeignKey("threads.id", ondelete="CASCADE")),
    sa.Column("type", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("chainlitKey", sa.Text),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("display", sa.Text),
    sa.Column("objectKey", sa.Text),
    sa.Column("size", sa.Text),
    sa.Column("page", sa.Integer),
    sa.Column("language", sa.Text),
    _id("forId"),
    sa.Column("mime", sa.Text),
    sa.Column("props", _JSON),
    sa.Column("autoPlay", sa.Boolean),
    sa.Column("playerConfig", _JSON),
)

feedbacks = sa.Table(
    "feedbacks",
    metadata,
    _id(primary_key=True),
    _id("forId", nullable=False),
    _id("threadId", sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("value", sa.Integer, nullable=False),
    sa.Column("comment", sa.Text),
    sa.Index("ix_feedbacks_thread", "threadId"),
)

# Ours, not Chainlit's: a reviewer's decision on a rating that would become training data
# (ray_app.chat.review). ``digest`` is what was reviewed; an edited rating is pending again.
feedback_reviews = sa.Table(
    "feedback_reviews",
    metadata,
    _id("feedbackId", primary_key=True),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("decidedAt", sa.Text, nullable=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.Column("note", sa.Text),
)


def sync_url(url: str) -> str:
    """The same database through a synchronous driver (schema upgrades, the feedback reader)."""
    return url.replace("sqlite+aiosqlite://", "sqlite://").replace("postgresql+asyncpg://", "postgresql+psycopg2://")


def upgrade_schema(url: str) -> list[str]:
    """Create missing tables and add missing columns; returns what it changed (empty when current).

    Never drops or alters existing columns: data written by older versions stays readable.
    """
    if url.startswith("sqlite"):
        from pathlib import Path

        database = sa.engine.make_url(sync_url(url)).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(sync_url(url))
    changes: list[str] = []
    try:
        with engine.begin() as connection:
            inspector = sa.inspect(connection)
            existing = set(inspector.get_table_names())
            for table in metadata.sorted_tables:
                if table.name not in existing:
                    table.create(connection)
                    changes.append(f"created table {table.name}")
                    continue
                present = {column["name"] for column in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in present:
                        continue
                    kind = column.type.compile(dialect=connection.dialect)
                    connection.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                    changes.append(f"added column {table.name}.{column.name}")
    finally:
        engine.dispose()
    return changes
