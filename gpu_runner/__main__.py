"""`python -m gpu_runner`: one runner subprocess for one device.

Started and supervised by the service; never imports `service`. Logs are JSON
lines on stderr; stdout is pointed at stderr too, so a library's stray print
can never be mixed into anything the service parses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_runner")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runner-id", default=None)
    parser.add_argument("--log-level", default=os.environ.get("BOOTHD_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)

    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from events.logsetup import configure_logging
    from events.settings import Settings, SettingsError, load_settings

    configure_logging(args.log_level, "json")
    try:
        inherited = os.environ.get("BOOTHD_SETTINGS_JSON")
        if inherited:  # started by the service: its effective settings, whole
            settings = Settings.model_validate_json(inherited)
        else:
            settings = load_settings(args.config)
        settings = settings.with_overrides(data_dir=args.data_dir)
    except (SettingsError, ValueError) as exc:
        print(f"runner: configuration error: {exc}", file=sys.stderr)
        return 2

    # Hub access must be decided before huggingface_hub is first imported.
    from gpu_runner.models import configure_hub_access

    configure_hub_access(settings.network.allow_model_downloads)

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(settings.runner.torch_threads)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    from gpu_runner.worker import main_async, new_runner_id

    runner_id = args.runner_id or new_runner_id(args.device)
    return asyncio.run(main_async(settings, args.device, runner_id))


if __name__ == "__main__":
    sys.exit(main())
