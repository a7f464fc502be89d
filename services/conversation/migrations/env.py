"""Alembic environment: runs on the connection ConversationDB.migrate() hands over.

There is no alembic.ini: the store calls `alembic upgrade head` itself at startup, inside its own
transaction (and, on PostgreSQL, under an advisory lock).
"""

from __future__ import annotations

from alembic import context

from services.conversation.db import METADATA, VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through services.conversation.db.ConversationDB.migrate()")

context.configure(connection=connection, target_metadata=METADATA, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
