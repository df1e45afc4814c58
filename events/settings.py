"""boothd settings: `config.toml` loaded into pydantic models.

The settings live in `events` (the package both processes share) because the
runner subprocess reads the same file as the service and must never import
`service`. Unknown keys and bad values are start-up errors that name the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SettingsError(Exception):
    """config.toml could not be read or holds an unknown key or a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class StorageSettings(_Section):
    data_dir: Path = Path("data")
    # FULL: an acknowledged append survives power loss. NORMAL: faster (no fsync
    # per commit in WAL mode) but the last commits may be lost on power loss;
    # they are never corrupted either way.
    durability: Literal["full", "normal"] = "full"


class RunnerSettings(_Section):
    devices: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    torch_threads: int = Field(default=2, ge=1)
    pipeline_cache_mb: int = Field(default=4096, ge=0)


class ModelSettings(_Section):
    path: str
    family: Literal["sd15", "sd2", "sdxl", "flux"] | None = None
    config: str | None = None


class ApiKey(_Section):
    tenant: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    key: str | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class AuthSettings(_Section):
    keys: list[ApiKey] = Field(default_factory=list)


class NetworkSettings(_Section):
    allow_model_downloads: bool = False
    allow_private_urls: bool = False
    download_timeout_seconds: float = Field(default=30.0, gt=0)
    max_download_bytes: int = Field(default=200 * 1024 * 1024, gt=0)


class RetentionSettings(_Section):
    hours: float = Field(default=48.0, gt=0)
    sweep_interval_seconds: float = Field(default=300.0, gt=0)


class WebhookSettings(_Section):
    timeout_seconds: float = Field(default=10.0, gt=0)
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0]
    )
    progress_interval_seconds: float = Field(default=5.0, ge=0)


class LimitSettings(_Section):
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    max_images_per_dataset: int = Field(default=100, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_steps: int = Field(default=20_000, ge=1)
    max_num_images: int = Field(default=16, ge=1)
    max_zip_members: int = Field(default=1000, ge=1)
    max_zip_uncompressed_bytes: int = Field(default=1024 * 1024 * 1024, ge=1)
    max_zip_ratio: float = Field(default=200.0, gt=1)


class JobSettings(_Section):
    default_base_model: str = "tiny-sd15"
    state_every_steps: int = Field(default=100, ge=1)
    max_attempts: int = Field(default=3, ge=1)


class DocsSettings(_Section):
    # Both set: /docs (Swagger UI) asks for HTTP basic auth. Empty: open.
    username: str = ""
    password: str = ""


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    runner: RunnerSettings = RunnerSettings()
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    auth: AuthSettings = AuthSettings()
    network: NetworkSettings = NetworkSettings()
    retention: RetentionSettings = RetentionSettings()
    webhooks: WebhookSettings = WebhookSettings()
    limits: LimitSettings = LimitSettings()
    jobs: JobSettings = JobSettings()
    docs: DocsSettings = DocsSettings()

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in value:
            if not name or any(c in name for c in "/\\:") or name.startswith("."):
                raise ValueError(f"invalid model name {name!r}")
        return value

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with CLI overrides (`data_dir`, `host`, `port`) applied,
        validated like the file itself."""
        data = self.model_dump()
        for key in ("host", "port"):
            if overrides.get(key) is not None:
                data["server"][key] = overrides[key]
        if overrides.get("data_dir") is not None:
            data["storage"]["data_dir"] = Path(overrides["data_dir"])
        return parse_settings(data, "command line")


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def parse_settings(raw: dict[str, Any], source: str = "config.toml") -> Settings:
    """Validate a parsed TOML document; errors name every offending key."""
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = _dotted(err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r}")
            else:
                problems.append(f"{key}: {err['msg']}")
        raise SettingsError(f"{source}: " + "; ".join(problems)) from None


def load_settings(path: Path | None) -> Settings:
    """Load settings from `path` (defaults when `path` is None)."""
    if path is None:
        return Settings()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None
    settings = parse_settings(raw, str(path))
    base = path.parent
    # A relative data folder is relative to the config file, not the cwd.
    if not settings.storage.data_dir.is_absolute():
        settings = settings.with_overrides(data_dir=base / settings.storage.data_dir)
    return settings
