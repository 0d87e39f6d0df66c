"""Judge score of the tiny shapes model against images seen in training, for a named training setting.

Images seen, not seconds, is the axis: it transfers between machines, so settings can be compared on a
GPU and the winner's budget read off for a 2-core CPU (multiply by that machine's training images/s).

    python benchmarks/learning_curve.py --setting base --images 8000,16000,24000,32000 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from t2i_evolve.eval import evaluate
from t2i_evolve.judges import PixelJudge
from t2i_evolve.models import Sampler, SamplerConfig, TinyModelConfig, init_tiny_model
from t2i_evolve.train import TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, GrammarSlice, ProceduralTeacher

# Each setting is a set of TrainConfig overrides, plus `train_images` (the size of the teacher dataset)
# and `model` (TinyModelConfig overrides).
SETTINGS: dict[str, dict] = {
    "base": {},
    "snr5": {"snr_gamma": 5.0},
    "lr2e-3": {"lr": 2e-3},
    "batch16": {"batch_size": 16},
    "lr2e-3-snr5": {"lr": 2e-3, "snr_gamma": 5.0},
    "data20k": {"train_images": 20000},
    "ema999": {"ema_decay": 0.999},
    "nodropout": {"caption_dropout": 0.0},
    "b16-lr2e-3-snr5": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0},
    "b16-lr3e-3-snr5": {"batch_size": 16, "lr": 3e-3, "snr_gamma": 5.0},
    "b16-lr2e-3-snr5-ema99": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0, "ema_decay": 0.99},
    "b16-lr2e-3-snr5-narrow": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0,
                               "model": {"block_out_channels": (32, 32, 64)}},
    "b16-lr2e-3-snr5-attn16": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0,
                               "model": {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D",
                                                              "CrossAttnDownBlock2D")}},
    "b8-lr2e-3-snr5": {"batch_size": 8, "lr": 2e-3, "snr_gamma": 5.0},
    "narrow-attn16": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0,
                      "model": {"block_out_channels": (32, 32, 64), "only_cross_attention": False,
                                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")}},
    "narrow-attn16-xonly16": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0,
                              "model": {"block_out_channels": (32, 32, 64), "only_cross_attention": (False, True, False)}},
    "c16-attn16-xonly16": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0,
                           "model": {"block_out_channels": (16, 32, 64), "only_cross_attention": (False, True, False)}},
    "c24": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0, "model": {"block_out_channels": (24, 48, 48)}},
    "c24-attn16": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0,
                   "model": {"block_out_channels": (24, 48, 48),
                             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")}},
    "narrow-lr3e-3": {"batch_size": 16, "lr": 3e-3, "snr_gamma": 5.0, "model": {"block_out_channels": (32, 32, 64)}},
    "c24-lr3e-3": {"batch_size": 16, "lr": 3e-3, "snr_gamma": 5.0, "model": {"block_out_channels": (24, 48, 48)}},
    "narrow-b24": {"batch_size": 24, "lr": 2e-3, "snr_gamma": 5.0, "model": {"block_out_channels": (32, 32, 64)}},
    "narrow-data16k": {"batch_size": 16, "lr": 2e-3, "snr_gamma": 5.0, "train_images": 16000,
                       "model": {"block_out_channels": (32, 32, 64)}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="base", choices=sorted(SETTINGS))
    parser.add_argument("--images", default="8000,16000,24000,32000", help="Images seen at each evaluation.")
    parser.add_argument("--eval-prompts", type=int, default=192)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--max-groups", type=int, default=2)
    parser.add_argument("--p-size", type=float, default=0.3, help="Share of groups with a size word.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    overrides = dict(SETTINGS[args.setting])
    n_train = overrides.pop("train_images", 8000)
    model_config = TinyModelConfig(**overrides.pop("model", {}))
    batch = overrides.get("batch_size", 32)
    points = [int(x) for x in args.images.split(",")]
    slice_ = GrammarSlice(max_groups=args.max_groups, p_size=args.p_size)
    prompts = GrammarPrompts(slice_).sample(n_train, seed=args.seed)
    held_out = [p for p in GrammarPrompts(slice_).sample(4 * args.eval_prompts, seed=args.seed + 1) if p not in set(prompts)]
    held_out = held_out[: args.eval_prompts]
    data = TrainingSet.from_generator(ProceduralTeacher(), prompts)

    curve: list[dict] = []
    judge, sampling = PixelJudge(), SamplerConfig(steps=args.sample_steps)

    def judged(model, step):
        summary = evaluate(Sampler(model, sampling), judge, held_out, seed=10_000).summary()
        curve.append({"images": step * batch, "score": summary["score"], "skills": summary["skills"]})
        print(f"{args.setting}: {step * batch} images -> {summary['score']:.3f}", file=sys.stderr)
        return summary

    with tempfile.TemporaryDirectory() as tmp:
        init_tiny_model(f"{tmp}/base", model_config, seed=args.seed)
        eval_every = points[0] // batch
        config = TrainConfig(model=f"{tmp}/base", output_dir=f"{tmp}/run", steps=points[-1] // batch,
                             eval_every=eval_every, checkpoint_every=10**9, tracker="none", seed=args.seed, **overrides)
        started = time.perf_counter()
        last = Trainer(config, data, evaluate=judged).run()
    result = {"setting": args.setting, "train_images": n_train, "batch": batch, "curve": curve,
              "images_per_s": last.get("images_per_s"), "wall_s": time.perf_counter() - started}
    if args.json:
        print(json.dumps(result))
    else:
        for point in curve:
            skills = " ".join(f"{k} {v:.2f}" for k, v in point["skills"].items())
            print(f"{args.setting:>12} {point['images']:>7} images  score {point['score']:.3f}  {skills}")


if __name__ == "__main__":
    main()
