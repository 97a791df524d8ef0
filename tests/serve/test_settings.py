"""Settings: environment names, defaults, and the README's configuration table."""

from pathlib import Path

from serve.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def env_names(name, field) -> list[str]:
    alias = field.validation_alias
    if alias is None:
        return [name.upper()]
    return [c.upper() for c in getattr(alias, "choices", [alias])]


def test_sagemaker_port_and_defaults(monkeypatch):
    monkeypatch.delenv("SAGEMAKER_BIND_TO_PORT", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    s = Settings()
    assert s.port == 8080 and s.model_store == "./models" and s.device == "auto"
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9090")
    monkeypatch.setenv("MODEL_STORE", "s3://bucket/models/")
    monkeypatch.setenv("QUEUE_SIZE", "7")
    s = Settings()
    assert (s.port, s.model_store, s.queue_size) == (9090, "s3://bucket/models/", 7)


def test_every_setting_is_in_the_readme_table():
    text = README.read_text()
    for name, field in Settings.model_fields.items():
        assert any(f"`{env}`" in text for env in env_names(name, field)), f"README lacks {name}"
