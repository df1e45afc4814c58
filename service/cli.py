"""The `boothd` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

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


class DataDirLocked(Exception):
    """Another `boothd serve` holds the data folder."""


def lock_data_dir(data_dir: Path) -> int:
    """Take an exclusive lock on the data folder (held until the process exits).

    A second server on the same folder would run a second set of runners and
    a second projector over the same log; it refuses to start instead.
    """
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "boothd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirLocked(
            f"another boothd serve (pid {holder}) is already using the data folder {data_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


async def _serve(settings: Settings, start_runners: bool = True) -> int:
    import signal

    from aiohttp import web

    from service.app import create_app

    app = create_app(settings, start_runners=start_runners)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    sockets = runner.addresses
    port = sockets[0][1] if sockets else settings.server.port
    print(f"boothd listening on http://{settings.server.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("serve.stopping")
    # cleanup: stop accepting, end SSE streams, stop runners at a step boundary, close the log.
    await runner.cleanup()
    log.info("serve.stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        lock_data_dir(settings.storage.data_dir)
    except DataDirLocked as exc:
        print(f"boothd: {exc}", file=sys.stderr)
        return 3
    return asyncio.run(_serve(settings, start_runners=not args.no_runners))


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get("BOOTHD_URL", "http://127.0.0.1:8080"),
        help="server URL (env BOOTHD_URL)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("BOOTHD_API_KEY"), help="API key (env BOOTHD_API_KEY)"
    )


def _run_client(args: argparse.Namespace, fn: Any) -> int:
    from service.client import BoothdClient, ClientError

    async def go() -> int:
        async with BoothdClient(args.url, args.api_key) as client:
            return int(await fn(client))

    try:
        return asyncio.run(go())
    except ClientError as exc:
        print(f"boothd: {exc}", file=sys.stderr)
        return 1


def _generate_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "num_images": args.num_images, "seed": args.seed, "steps": args.gen_steps,
        "width": args.width, "height": args.height, "scheduler": args.scheduler,
        "guidance_scale": args.guidance_scale,
    }


def _add_generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--gen-steps", type=int, help="denoising steps")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--out", type=Path, help="download the results into this folder")


async def _finish(client: Any, job: dict[str, Any], out: Path | None) -> int:
    from service.client import describe_results, watch

    job = await watch(client, job["id"])
    for line in describe_results(job, client.url):
        print(line)
    if out is not None:
        for item in job["result"]["checkpoints"] + job["result"]["images"]:
            name = item["id"] + ("." + item["format"] if "seed" in item else ".safetensors")
            path = await client.download(item["url"], out / name)
            print(f"  saved {path}")
    return 0 if job["state"] == "succeeded" else 1


def cmd_train(args: argparse.Namespace) -> int:
    from service.client import generate_entries

    async def go(client: Any) -> int:
        dataset = await client.upload_dataset(args.path)
        print(f"dataset {dataset['id']}: {dataset['images']} images", file=sys.stderr)
        for rejected in dataset.get("rejected", []):
            print(f"  rejected {rejected['name']}: {rejected['reason']}", file=sys.stderr)
        train: dict[str, Any] = {"dataset_id": dataset["id"], "instance_prompt": args.prompt}
        for key in ("steps", "method", "resolution", "learning_rate"):
            if getattr(args, key) is not None:
                train[key] = getattr(args, key)
        body: dict[str, Any] = {"type": "dreambooth", "train": train}
        if args.base_model:
            body["base_model"] = args.base_model
        if args.generate:
            body["type"] = "dreambooth_image_gen"
            body["generate"] = generate_entries(args.generate, **_generate_params(args))
        job = await client.create_job(body)
        print(f"job {job['id']} queued", file=sys.stderr)
        return await _finish(client, job, args.out)

    return _run_client(args, go)


def cmd_generate(args: argparse.Namespace) -> int:
    from service.client import generate_entries

    async def go(client: Any) -> int:
        params = _generate_params(args)
        if args.model:
            params["model"] = args.model
        body = {"type": "image_gen", "generate": generate_entries(args.prompt, **params)}
        job = await client.create_job(body)
        print(f"job {job['id']} queued", file=sys.stderr)
        return await _finish(client, job, args.out)

    return _run_client(args, go)


def cmd_watch(args: argparse.Namespace) -> int:
    async def go(client: Any) -> int:
        return await _finish(client, {"id": args.job_id}, args.out)

    return _run_client(args, go)


def cmd_jobs(args: argparse.Namespace) -> int:
    from service.client import render_progress

    async def go(client: Any) -> int:
        page = await client.list_jobs(state=args.state, type=args.type, limit=args.limit)
        for job in page["jobs"]:
            print(f"{job['created_at']}  {job['type']:<20} " + render_progress(job))
        return 0

    return _run_client(args, go)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    print(settings.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boothd", description="DreamBooth / LoRA service")
    parser.add_argument("--log-level", default=os.environ.get("BOOTHD_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP service and its runners")
    _add_settings_flags(p)
    p.add_argument(
        "--no-runners", action="store_true",
        help="accept and serve jobs without starting runners (jobs stay queued)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="upload images, train, show progress, print the results")
    _add_client_flags(p)
    p.add_argument("path", type=Path, help="a zip file or a folder of images")
    p.add_argument("--prompt", required=True, help="instance prompt, e.g. 'photo of sks dog'")
    p.add_argument("--steps", type=int)
    p.add_argument("--method", choices=["lora", "full"])
    p.add_argument("--resolution", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--base-model")
    p.add_argument("--generate", action="append", metavar="PROMPT",
                   help="generate from the result (repeatable)")
    _add_generate_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images from a base or trained model")
    _add_client_flags(p)
    p.add_argument("prompt", nargs="+")
    p.add_argument("--model", help="job:<id>, checkpoint:<id> or a base model name")
    _add_generate_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("watch", help="follow a job's progress live")
    _add_client_flags(p)
    p.add_argument("job_id")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("jobs", help="list jobs")
    _add_client_flags(p)
    p.add_argument("--state")
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_jobs)

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
