"""Settings come from the environment, validated, at call time (never at import)."""

import pytest


def test_settings_from_environment(monkeypatch):
    from app.config import Settings

    monkeypatch.setenv("APP_API_KEYS", "k1, k2")
    monkeypatch.setenv("APP_CORS_ORIGINS", '["http://a.example"]')
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "7")
    s = Settings()
    assert s.api_keys == ["k1", "k2"] and s.cors_origins == ["http://a.example"] and s.max_batch_size == 7
    monkeypatch.setenv("APP_DEFAULT_MAX_NEW_TOKENS", "5000")
    with pytest.raises(ValueError):
        Settings()
