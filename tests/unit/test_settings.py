"""Settings: local defaults, and a bad value fails naming the variable."""

import pytest

from service.settings import Settings, SettingsError, redact_url


def test_defaults_work_locally():
    settings = Settings.from_env({})

    assert settings.http_host == "127.0.0.1"
    assert settings.http_port == 8080
    assert settings.log_format == "json"
    assert settings.database_url.startswith("postgresql://")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTP_PORT", "eighty"),
        ("HTTP_PORT", "70000"),
        ("LOG_FORMAT", "xml"),
        ("DATABASE_URL", "mysql://x/y"),
        ("AMQP_URL", "not a url"),
        ("WORKER_BATCH_WAIT_MS", "-1"),
        ("AMQP_QUEUE", "has space"),
    ],
)
def test_bad_value_names_the_variable(variable, value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})

    assert variable in str(caught.value)


def test_secret_values_stay_out_of_messages_and_repr():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DATABASE_URL": "mysql://user:hunter2@db/x"})
    settings = Settings.from_env({"AMQP_URL": "amqp://user:hunter2@broker:5672/"})

    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(settings)


def test_redact_url_hides_only_the_password():
    assert redact_url("postgresql://app:secret@db:5432/images") == "postgresql://app:***@db:5432/images"
    assert redact_url("postgresql://db/images") == "postgresql://db/images"


def test_prefetch_smaller_than_batch_is_refused():
    with pytest.raises(SettingsError, match="WORKER_PREFETCH"):
        Settings.from_env({"WORKER_PREFETCH": "10", "WORKER_BATCH_SIZE": "100"})
