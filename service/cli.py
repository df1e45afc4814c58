"""The `boothd` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import structlog

from events.logsetup import configure_logging
from events.settings import Settings, SettingsError, load_settings
from gpu_runner.errors import RunnerError

log = structlog.get_logger(__name__)


def event_db_path(settings: Settings) -> Path:
    """Where the event log lives inside the data folder."""
    return settings.storage.data_dir / "events.db"


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("BOOTHD_CONFIG"),
        help="config.toml to read (env BOOTHD_CONFIG; default: built-in defaults)",
    )
    parser.add_argument("--data-dir", type=Path, help="data folder (overrides [storage] data_dir)")
    parser.add_argument("--host", help="listen address (overrides [server] host)")
    parser.add_argument("--port", type=int, help="listen port (overrides [server] port)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """config.toml (when given) with the CLI overrides applied."""
    settings = load_settings(Path(args.config) if args.config else None)
    return settings.with_overrides(data_dir=args.data_dir, host=args.host, port=args.port)


async def _rebuild(settings: Settings) -> int:
    from events.projector import rebuild_job_read_model
    from events.store import SQLiteEventStore

    store = await SQLiteEventStore.open(event_db_path(settings), settings.storage.durability)
    try:
        position = await rebuild_job_read_model(store)
    finally:
        await store.close()
    print(f"rebuilt job read model up to event {position}")
    return 0


def cmd_rebuild_projections(args: argparse.Namespace) -> int:
    return asyncio.run(_rebuild(settings_from_args(args)))


def cmd_init_model(args: argparse.Namespace) -> int:
    from gpu_runner.tiny_models import init_model_main

    settings = settings_from_args(args)
    path = init_model_main(args.family, args.name, settings.storage.data_dir)
    print(path)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    print(settings.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boothd", description="DreamBooth / LoRA service")
    parser.add_argument("--log-level", default=os.environ.get("BOOTHD_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rebuild-projections", help="drop and rebuild every read model from the log")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_rebuild_projections)

    p = sub.add_parser("init-model", help="write a tiny random model into the data folder")
    _add_settings_flags(p)
    p.add_argument("--family", choices=["sd15", "sdxl", "flux"], default="sd15")
    p.add_argument("name")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("check-config", help="validate config.toml and print the settings")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"boothd: configuration error: {exc}", file=sys.stderr)
        return 2
    except RunnerError as exc:
        print(f"boothd: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
