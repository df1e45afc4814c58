"""config.toml loading: defaults, overrides and start-up errors that name the key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from events.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_equals_the_defaults() -> None:
    """config.toml lists every setting with its default value."""
    shipped = load_settings(ROOT / "config.toml")
    defaults = Settings()
    assert shipped.model_dump(exclude={"storage"}) == defaults.model_dump(exclude={"storage"})
    assert shipped.storage.data_dir == ROOT / "data"
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    for section, model in Settings.model_fields.items():
        if section == "models":
            continue
        assert section in raw, f"config.toml lacks [{section}]"
        assert model.annotation is not None
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert key in raw[section], f"config.toml lacks {section}.{key}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown key 'server.prot'"),
        ("[nope]\n", "unknown key 'nope'"),
        ('[storage]\ndurability = "sometimes"\n', "storage.durability"),
        ("[limits]\nmax_steps = 0\n", "limits.max_steps"),
        ('[models.x]\npath = "/m"\nfamily = "sd9"\n', "models.x.family"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Unknown keys and bad values are a clear error naming the key."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        load_settings(path)


def test_cli_flags_override_and_are_validated(tmp_path: Path) -> None:
    """--data-dir/--host/--port override the file; a bad override is a start-up error."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\n')
    settings = load_settings(cfg).with_overrides(port=9100, host="0.0.0.0", data_dir="/x")
    assert (settings.server.port, settings.server.host, str(settings.storage.data_dir)) == (
        9100, "0.0.0.0", "/x",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "service", "check-config", "--config", str(cfg), "--port", "70000"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "server.port" in proc.stderr
