"""Training benchmark: boothd's LoRA and full training on tiny SD 1.x beside a bare loop.

The bare loop is measured in the same run on the same model, data, batch and
resolution: VAE encode, text encode, noise, UNet forward, loss, backward,
optimizer step — nothing else. Each variant runs in its own process so its
peak RSS is its own. Steps/s are taken between the first reported step and
the last, so model loading is not counted for either side.

Last line: {"lora_steps_ratio", "full_steps_ratio", "lora_rss_ratio", "full_rss_ratio"}
(boothd ÷ bare). `--quick` finishes in under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESOLUTION = 64
BATCH = 1
LORA_RANK = 4


def _images(folder: Path, n: int = 4) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (RESOLUTION, RESOLUTION), (50 * i, 100, 200 - 40 * i))
        path = folder / f"{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_boothd(model: Path, method: str, steps: int, work: Path) -> dict[str, float]:
    from gpu_runner.training import TrainConfig, TrainHooks, TrainImage, train

    config = TrainConfig(
        instance_prompt="photo of sks dog",
        dataset_id="bench",
        method=method,  # type: ignore[arg-type]
        steps=steps,
        resolution=RESOLUTION,
        batch_size=BATCH,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_RANK,
        learning_rate=1e-4,
    )
    images = [TrainImage(path=p, caption="photo of sks dog") for p in _images(work / "img")]
    marks: list[tuple[int, float]] = []

    def on_progress(step: int, total: int, loss: float, lr: float) -> None:
        marks.append((step, time.perf_counter()))

    hooks = TrainHooks(on_progress=on_progress)
    train(model, "sd15", config, images, [], work / "out", "cpu", hooks)
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return {"steps_per_s": (s1 - s0) / (t1 - t0), "peak_rss_mb": _peak_rss_mb()}


def run_bare(model: Path, method: str, steps: int, work: Path) -> dict[str, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=LORA_RANK,
                lora_alpha=LORA_RANK,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pixels = [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        .permute(2, 0, 1)
        .unsqueeze(0)
        for p in _images(work / "img")
    ]
    ids = tokenizer(
        ["photo of sks dog"] * BATCH,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    unet.train()
    times = []
    for step in range(steps):
        batch = torch.cat([pixels[(step * BATCH + k) % len(pixels)] for k in range(BATCH)])
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    warm = max(1, steps // 5)
    return {
        "steps_per_s": (steps - 1 - warm) / (times[-1] - times[warm]),
        "peak_rss_mb": _peak_rss_mb(),
    }


def child(kind: str, method: str, steps: int, model: Path, work: Path) -> None:
    import torch

    torch.set_num_threads(2)
    if not model.exists():
        from gpu_runner.tiny_models import create_tiny_model

        create_tiny_model("sd15", model)
    runner = run_boothd if kind == "boothd" else run_bare
    result = runner(model, method, steps, work)
    print(json.dumps({"kind": kind, "method": method, **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "STEPS"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.child:
        kind, method, steps = args.child
        child(kind, method, int(steps), args.model, args.work)
        return
    steps = {"lora": 25, "full": 10} if args.quick else {"lora": 150, "full": 50}
    results: dict[tuple[str, str], dict[str, float]] = {}
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="boothd-bench-train-") as tmp:
        model = Path(tmp) / "tiny-sd15"
        for method in ("lora", "full"):
            for kind in ("bare", "boothd"):
                work = Path(tmp) / f"{kind}-{method}"
                out = subprocess.run(
                    [sys.executable, __file__, "--child", kind, method, str(steps[method]),
                     "--model", str(model), "--work", str(work)],
                    capture_output=True, text=True, env=env, check=True,
                )
                line = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(line), flush=True)
                results[(kind, method)] = line

    def ratio(method: str, key: str) -> float:
        return round(results[("boothd", method)][key] / results[("bare", method)][key], 3)

    print(
        json.dumps(
            {
                "lora_steps_ratio": ratio("lora", "steps_per_s"),
                "full_steps_ratio": ratio("full", "steps_per_s"),
                "lora_rss_ratio": ratio("lora", "peak_rss_mb"),
                "full_rss_ratio": ratio("full", "peak_rss_mb"),
                "steps": steps,
                "quick": args.quick,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
