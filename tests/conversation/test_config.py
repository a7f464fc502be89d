"""Which database the service uses, and which URLs stop it at startup."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load
from services.conversation.config import ConversationConfig


def test_sqlite_file_by_default_and_database_url_wins() -> None:
    assert load(ConversationConfig, environ={"CONVERSATION_DB": "/tmp/x/c.db"}).url == "sqlite:////tmp/x/c.db"
    url = "postgresql+psycopg://colloquy@db:5432/colloquy"
    assert load(ConversationConfig, environ={"CONVERSATION_DB": "/tmp/c.db", "DATABASE_URL": url}).url == url
    assert load(ConversationConfig, environ={"DATABASE_URL": "postgresql://u@h/d"}).database_url == "postgresql://u@h/d"


@pytest.mark.parametrize("url", ["mysql://u@h/d", "sqlite://", "sqlite:///:memory:", "not a url",
                                 "postgresql+asyncpg://u@h/d"])
def test_a_database_url_the_store_cannot_use_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load(ConversationConfig, environ={"DATABASE_URL": url})
