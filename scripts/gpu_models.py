"""Benchmark models for the GPU check: the bundled models' shapes and tokenizers, random weights.

The GPU machine has no network and no room in what travels to it for SmolLM2's 517 MiB of
weights, so its benchmarks run on models with the bundled models' configs and tokenizers and
seeded random float32 weights: the same parameters, FLOPs and bytes per token as the real
models (not the same text). ``skeleton`` runs where the models are prepared and copies every
file but the weights; ``build`` runs on the GPU machine and writes loadable model directories.

    python scripts/gpu_models.py skeleton DIR        # DIR/<name>/: config and tokenizer files
    python scripts/gpu_models.py build DIR OUT       # OUT/<name>/: those with random weights
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

KINDS = {"smollm2-135m": "causal_lm", "minilm-l6": "sequence_classifier"}
"""The bundled models the benchmarks use, and what each is loaded as."""
SEED = 0
LEFT_OUT = {"README.md", "alignd-prepared.json"}  # and dotfiles
"""Files of a prepared model directory a skeleton does not need (besides the weights)."""
RANDOM_MARKER = "alignd-random-weights.json"
"""Written into each built directory: where its config came from, and that its weights are
random."""


def skeleton(out: Path) -> None:
    """Copies the config and tokenizer files of each prepared bundled model to ``out/<name>``."""
    from alignd.models import resolve_model

    for name in KINDS:
        source = resolve_model(name)  # FileNotFoundError says how to prepare it
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if (
                path.is_file()
                and path.suffix != ".safetensors"
                and path.name not in LEFT_OUT
                and not path.name.startswith(".")
            ):
                shutil.copy2(path, target / path.name)
        print(f"{name}: {sum(p.stat().st_size for p in target.iterdir()) / 1e6:.1f} MB")


def build(skeletons: Path, out: Path) -> None:
    """Writes ``out/<name>``: each skeleton's files and seeded random float32 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    for name, kind in KINDS.items():
        source = skeletons / name
        if not (source / "config.json").is_file():
            raise SystemExit(f"{source} has no config.json: run scripts/gpu_wheels.sh first")
        config = AutoConfig.from_pretrained(source)
        if kind == "sequence_classifier":
            config.num_labels = 1
        cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = cls.from_config(config, dtype=torch.float32)
        target = out / name
        model.save_pretrained(target)
        for path in source.iterdir():
            if path.name != "config.json":
                shutil.copy2(path, target / path.name)
        marker = {"config_of": name, "weights": f"random, torch.manual_seed({SEED})"}
        (target / RANDOM_MARKER).write_text(json.dumps(marker) + "\n")
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {type(model).__name__}, {params / 1e6:.1f}M parameters -> {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("skeleton", help="copy config and tokenizer files").add_argument(
        "out", type=Path
    )
    builder = commands.add_parser("build", help="write models with random weights")
    builder.add_argument("skeletons", type=Path)
    builder.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "skeleton":
        skeleton(args.out)
    else:
        build(args.skeletons, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
