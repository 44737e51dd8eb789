"""`moecli sample <run dir> --prompt "…"`: generate text from a saved toylm run.

The model is rebuilt from the run's own composed config (`.hydra/config.yaml`) through the same combiner
factory as training, then loaded from `model.pt` (written by the task at the end of the run) or, for an
unfinished run, from the last checkpoint. Sampling is reproducible under `--seed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecli sample", description="Generate text from a saved toylm run.")
    p.add_argument("run_dir", type=Path, help="a run folder of task=toylm (holds .hydra/config.yaml)")
    p.add_argument("--prompt", default=None, help="text to continue (default: the run's task.sample_prompt)")
    p.add_argument("--length", type=int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="sequences generated together (default 1; expert choice needs several)")
    return p


def load_run_model(run_dir: Path):
    """(task, model) rebuilt from `run_dir`, weights loaded, in eval mode; ConfigError on a bad folder."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moecli.errors import ConfigError
    from moecli.run import combiner_factory

    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config)
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    choices = OmegaConf.load(hydra_yaml).hydra.runtime.choices if hydra_yaml.is_file() else {}
    task_name, combiner_name = choices.get("task", "?"), choices.get("combiner", "?")
    if cfg.task.get("_target_") != "tasks.toylm.ToyLM":
        raise ConfigError(f"moecli sample needs a task=toylm run; {run_dir} is task={task_name}")
    task = instantiate(cfg.task)
    model = task.build_model(combiner_factory(cfg.combiner, combiner_name, task_name))
    weights = run_dir / "model.pt"
    if weights.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif (run_dir / "checkpoints" / "last.pt").is_file():
        checkpoint = run_dir / "checkpoints" / "last.pt"
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    else:
        raise ConfigError(f"{run_dir} holds no weights (model.pt or checkpoints/last.pt); "
                          "did the run finish?")
    model.load_state_dict(state)
    return task, model.eval()


def sample_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from moecli.errors import ConfigError
    from tasks.toylm import generate

    if args.length < 0 or args.num_samples < 1:
        print("error: --length must be >= 0 and --num-samples >= 1", file=sys.stderr)
        return 2
    try:
        task, model = load_run_model(args.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompt = task.sample_prompt if args.prompt is None else args.prompt
    try:
        texts = generate(model, prompt.encode("utf-8"), args.length, args.temperature, args.top_k, args.seed,
                         args.num_samples)
    except ConfigError as err:  # e.g. expert choice needs several sequences per position group
        print(f"error: {err} (try --num-samples {task.batch_size}, the training group size)", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(prompt + text.decode("utf-8", errors="replace"))
    return 0
