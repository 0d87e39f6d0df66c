"""Training throughput of our `Trainer` against a plain reference loop, on the same model, side by side.

The reference is written the way diffusers' own text-to-image training example writes its loop: a
`datasets`-style list of (PIL image, caption) pairs, per-item transforms into a torch `DataLoader`, one
`Accelerator`, noise and timesteps drawn per batch, EMA of the weights after each step. Our trainer
keeps images as one uint8 tensor and indexes batches by step. Both train the UNet and the text encoder
with AdamW at the same batch size; runs alternate (ours, reference, ours, ...) so machine noise hits both.

Model FLOP utilisation = model FLOPs per training image (counted with torch's FlopCounterMode on one
forward + backward) x images/s, over the machine's measured dense matmul FLOP/s, all in this run.

With `--lora-rank N` our trainer also runs with LoRA adapters of that rank on both parts (in the same
alternation): what a round of `evolve` with `lora` costs against full fine-tuning.

    python benchmarks/train_throughput.py [--steps 30] [--batch 32] [--repeats 2] [--lora-rank 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from t2i_evolve.models import Sampler, SamplerConfig, T2IModel, init_tiny_model
from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, GrammarSlice, ProceduralTeacher


def matmul_flops(device: torch.device, n: int = 2048, dtype=torch.float32) -> float:
    """Dense matmul FLOP/s of this machine (the best of several timed products)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_image(model: T2IModel, batch: int) -> float:
    pixels = torch.zeros(batch, 3, model.resolution, model.resolution, device=model.device)
    ids = model.tokenize(["a red circle left of two blue squares"] * batch)
    with FlopCounterMode(display=False) as counter:
        model.denoising_loss(pixels, model.encode_tokens(ids)).backward()
    model.unet.zero_grad(set_to_none=True)
    model.text_encoder.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def run_ours(model_dir: str, data: TrainingSet, steps: int, batch: int, out: str,
             lora_rank: int | None = None) -> float:
    config = TrainConfig(model=model_dir, output_dir=out, steps=steps + 5, batch_size=batch, warmup_steps=0,
                         checkpoint_every=10**9, log_every=steps + 5, tracker="none",
                         lora=LoraSettings(rank=lora_rank) if lora_rank else None)
    trainer = Trainer(config, data)
    trainer.config = config.model_copy(update={"steps": 5})  # warm-up steps, untimed
    while trainer.step < 5:
        trainer._train_step()
        trainer.step += 1
    _sync(trainer.accelerator.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer._train_step()
        trainer.step += 1
    _sync(trainer.accelerator.device)
    return steps * batch / (time.perf_counter() - start)


def run_reference(model_dir: str, pairs: list, steps: int, batch: int) -> float:
    """A plain loop in the style of diffusers' train_text_to_image example."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = T2IModel.from_pretrained(model_dir, device=accelerator.device)
    unet, text_encoder, tokenizer, noise_scheduler = model.unet, model.text_encoder, model.tokenizer, model.scheduler

    def transform(image):  # ToTensor + Normalize([0.5], [0.5])
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1

    examples = [{"pixel_values": transform(im), "input_ids": tokenizer(text, padding="max_length", truncation=True,
                 max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]} for im, text in pairs]

    def collate(batch_items):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in batch_items]).float(),
                "input_ids": torch.stack([e["input_ids"] for e in batch_items])}

    loader = torch.utils.data.DataLoader(examples, shuffle=True, collate_fn=collate, batch_size=batch, drop_last=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, loader,
                                                                               lr_scheduler)
    ema = EMAModel(list(unet.parameters()) + list(text_encoder.parameters()), decay=0.995)
    unet.train()
    text_encoder.train()
    done, timed_from = 0, None
    while done < steps + 5:
        for item in loader:
            if done == 5:
                _sync(accelerator.device)
                timed_from = time.perf_counter()
            latents = item["pixel_values"]  # pixel space: the "VAE" is the identity
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            encoded = text_encoder(item["input_ids"])
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
            pred = unet(noisy, timesteps, encoder_hidden_states=encoded.last_hidden_state,
                        class_labels=encoded.pooler_output).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(list(unet.parameters()) + list(text_encoder.parameters()))
            done += 1
            if done == steps + 5:
                break
    _sync(accelerator.device)
    return steps * batch / (time.perf_counter() - timed_from)


def sampling_rate(model: T2IModel, batch: int, steps: int = 20) -> float:
    sampler = Sampler(model, SamplerConfig(steps=steps, batch_size=batch))
    prompts = GrammarPrompts().sample(batch, seed=0)
    sampler.generate(prompts[:4], list(range(4)))
    _sync(model.device)
    start = time.perf_counter()
    sampler.generate(prompts, list(range(batch)))
    _sync(model.device)
    return batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per run (after 5 warm-up steps).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=None, help="Also time ours with LoRA of this rank.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = GrammarPrompts(GrammarSlice(max_groups=2)).sample(1024, seed=0)
    images = ProceduralTeacher().generate(prompts, list(range(len(prompts))))
    data = TrainingSet.from_images(prompts, images)
    with tempfile.TemporaryDirectory() as tmp:
        init_tiny_model(f"{tmp}/base")
        model = T2IModel.from_pretrained(f"{tmp}/base", device=device)
        peak = matmul_flops(device)
        per_image = flops_per_image(model, args.batch)
        ours, reference, lora = [], [], []
        for r in range(args.repeats):
            ours.append(run_ours(f"{tmp}/base", data, args.steps, args.batch, f"{tmp}/run{r}"))
            reference.append(run_reference(f"{tmp}/base", list(zip(images, prompts)), args.steps, args.batch))
            if args.lora_rank:
                lora.append(run_ours(f"{tmp}/base", data, args.steps, args.batch, f"{tmp}/lora{r}", args.lora_rank))
        sample = sampling_rate(model, args.sample_batch)
    best_ours, best_ref = max(ours), max(reference)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "batch": args.batch,
        "ours_images_per_s": best_ours,
        "reference_images_per_s": best_ref,
        "speedup": best_ours / best_ref,
        "model_gflop_per_image": per_image / 1e9,
        "matmul_gflops": peak / 1e9,
        "ours_mfu": per_image * best_ours / peak,
        "reference_mfu": per_image * best_ref / peak,
        "sampling_images_per_s_ddim20": sample,
        "runs": {"ours": ours, "reference": reference},
    }
    if lora:
        result |= {"lora_rank": args.lora_rank, "ours_lora_images_per_s": max(lora)}
        result["runs"]["ours_lora"] = lora
    if args.json:
        print(json.dumps(result))
        return
    print(f"device: {result['device']}, batch {args.batch}, matmul {peak / 1e9:.1f} GFLOP/s, "
          f"model {per_image / 1e6:.1f} MFLOP per training image", file=sys.stderr)
    print(f"{'loop':<12}{'images/s':>10}{'MFU':>8}")
    print(f"{'ours':<12}{best_ours:>10.1f}{result['ours_mfu']:>8.1%}")
    print(f"{'reference':<12}{best_ref:>10.1f}{result['reference_mfu']:>8.1%}")
    if lora:
        print(f"{f'ours, LoRA {args.lora_rank}':<12}{max(lora):>10.1f}{'':>8}  (the adapters only)")
    print(f"speedup {result['speedup']:.2f}x; sampling (DDIM 20 steps, batch {args.sample_batch}): {sample:.1f} images/s")


if __name__ == "__main__":
    main()
