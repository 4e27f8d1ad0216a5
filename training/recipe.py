"""Run a recipe: the phases that make a model, in order, as one command that can be killed and started again.

    python training/recipe.py training/configs/shapes_64_recipe.yaml              # the built-in model
    python training/recipe.py training/configs/shapes_64_recipe.yaml --steps_scale 0.01   # every phase shortened
    python training/recipe.py RECIPE --launcher "accelerate launch --multi_gpu --num_processes 8"

A recipe file names an `output_dir` and its `phases`, in order; each phase names its `script`
(train_vae.py, precompute_latents.py or train_dit.py) and that script's settings. Phase `p` writes
`output_dir/p`; a setting `$p` stands for that folder, so later phases start from earlier ones. A
phase whose folder holds a finished run (its training_summary.json, or a latent cache) is skipped; any
other runs with `--resume_from_checkpoint latest`, so a killed recipe continues where it stopped, and
a phase whose folder holds a run with other settings stops with the list of them (the trainer's
rule). `devices: {cuda: {...}}` (for the whole recipe, or one phase) sets what differs on that device;
its `batch_multiplier` k multiplies the batch by k, divides the step counts by k and multiplies the
learning rate by sqrt(k) (the usual rule for Adam), so that a phase sees the same number of samples.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from nanoi2v_diffusers.data.latent_cache import CACHE_INFO_FILE, LatentCacheInfo
from nanoi2v_diffusers.settings import coerce_settings
from nanoi2v_diffusers.training.precompute_latents import describe_source
from nanoi2v_diffusers.training.train_dit import DiTTrainingConfig
from nanoi2v_diffusers.training.train_vae import VAETrainingConfig
from nanoi2v_diffusers.training.trainer import CONFIG_FILE, SUMMARY_FILE

TRAINING = Path(__file__).resolve().parent
SCRIPTS = {"train_vae.py": VAETrainingConfig, "precompute_latents.py": DiTTrainingConfig,
           "train_dit.py": DiTTrainingConfig}  # fmt: skip


@dataclass
class Phase:
    name: str
    script: str
    settings: Dict[str, Any]  # the script's settings, output_dir (or cache_dir) included

    @property
    def output(self) -> Path:
        return Path(self.settings["cache_dir" if self.is_cache else "output_dir"])

    @property
    def is_cache(self) -> bool:
        return self.script == "precompute_latents.py"

    def config(self):
        return SCRIPTS[self.script](**coerce_settings(self.settings, SCRIPTS[self.script], where=self.name))

    def done(self) -> bool:
        """Whether the phase's folder holds its finished result; raises if it holds another run's."""
        if self.is_cache:
            if not (self.output / CACHE_INFO_FILE).is_file():
                return False
            info, config = LatentCacheInfo.load(self.output), self.config()
            made, wanted = (info.source, info.text_shape[0], info.text_clause_separator), (
                describe_source(config), config.max_sequence_length, config.text_clause_separator)  # fmt: skip
            changed = {key: (old, new) for key, old, new in zip(("clips", "max_sequence_length",
                       "text_clause_separator"), made, wanted) if old != new}  # fmt: skip
        elif not (self.output / SUMMARY_FILE).is_file():
            return False
        else:
            changed = self.config().changed_settings(yaml.safe_load((self.output / CONFIG_FILE).read_text()))
        if changed:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(f"Phase {self.name}: {self.output} holds a finished run with other settings ({listed}); "
                             "delete the folder to run the phase again.")  # fmt: skip
        return True


def load_recipe(path: Path, device: str, steps_scale: float = 1.0, overrides: Optional[Dict[str, Any]] = None,
                output_dir: Optional[str] = None) -> List[Phase]:  # fmt: skip
    """The phases of the recipe at `path`, with their settings for `device` ("cpu" or "cuda"), every step count
    (and cache size) scaled by `steps_scale`, and `overrides` set in every phase whose script has them."""
    recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    root = Path(output_dir or recipe["output_dir"])
    phases = []
    for name, spec in recipe["phases"].items():
        spec = dict(spec)
        script = spec.pop("script")
        if script not in SCRIPTS:
            raise ValueError(f"{path}: phase {name}: script must be one of {sorted(SCRIPTS)}; got {script!r}.")
        devices = {**recipe.get("devices", {}).get(device, {}), **spec.pop("devices", {}).get(device, {})}
        settings = {**spec, **devices}
        settings["cache_dir" if script == "precompute_latents.py" else "output_dir"] = str(root / name)
        _scale(settings, settings.pop("batch_multiplier", 1), steps_scale)
        fields = SCRIPTS[script].__dataclass_fields__
        settings.update({key: value for key, value in (overrides or {}).items() if key in fields})
        for key, value in settings.items():  # "$phase": that phase's folder
            if isinstance(value, str) and value.startswith("$"):
                settings[key] = str(root / value[1:])
        coerce_settings(settings, SCRIPTS[script], where=f"{path}: phase {name}")  # unknown keys, bad types: now
        phases.append(Phase(name, script, settings))
    return phases


def _scale(settings: Dict[str, Any], batch_multiplier: int, steps_scale: float) -> None:
    """Apply a device's batch multiplier and a shortened recipe's `steps_scale` to a phase's settings. The
    checkpoint and validation cadences follow the batch only: a shortened phase validates once, at its end."""
    batch_factor = 1
    if batch_multiplier != 1 and "train_batch_size" in settings:
        settings["train_batch_size"] *= batch_multiplier
        if "learning_rate" in settings:  # not in a cache phase, whose batch is only how many clips it encodes at once
            settings["learning_rate"] = float(settings["learning_rate"]) * math.sqrt(batch_multiplier)
        batch_factor = batch_multiplier
    for key, factor in (("max_train_steps", steps_scale), ("lr_warmup_steps", steps_scale),
                        ("checkpointing_steps", 1), ("validation_steps", 1)):  # fmt: skip
        if key in settings:
            settings[key] = max(1, math.ceil(int(settings[key]) * factor / batch_factor))
            settings[key] = min(settings[key], settings.get("max_train_steps", settings[key]))
    if "max_train_samples" in settings:  # a device trains on the same clips; a shortened recipe on fewer
        settings["max_train_samples"] = max(1, math.ceil(int(settings["max_train_samples"]) * steps_scale))


def run(recipe: Path, device: Optional[str] = None, steps_scale: float = 1.0,
        overrides: Optional[Dict[str, Any]] = None,
        launcher: Optional[Sequence[str]] = (sys.executable,), output_dir: Optional[str] = None) -> Path:  # fmt: skip
    """Run every phase that is not done yet, each in a process of its own started by `launcher` (None: in this
    process, one after the other); returns the last phase's folder (the recipe's result)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    phases = load_recipe(recipe, device, steps_scale, overrides, output_dir)
    print(f"Recipe {recipe} on {device}: {len(phases)} phases into {phases[0].output.parent}")
    start = time.perf_counter()
    for index, phase in enumerate(phases, 1):
        if phase.done():
            print(f"[{index}/{len(phases)}] {phase.name}: done ({phase.output})")
            continue
        print(
            f"[{index}/{len(phases)}] {phase.name}: {_describe(phase)}. {_eta(phases[index - 1 :], phases)}", flush=True
        )
        phase.config()  # its settings are valid, now that the folders it reads exist
        config_file = phase.output.parent / f"{phase.name}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(phase.settings, sort_keys=False), encoding="utf-8")
        argv = ["--config", str(config_file)] + ([] if phase.is_cache else ["--resume_from_checkpoint", "latest"])
        if launcher is None:
            _run_in_process(phase.script, argv)
        else:
            subprocess.run([*launcher, str(TRAINING / phase.script), *argv], check=True)
    minutes = (time.perf_counter() - start) / 60
    print(f"Recipe done in {minutes:.1f} min: {phases[-1].output}")
    return phases[-1].output


def _run_in_process(script: str, argv: List[str]) -> None:
    from accelerate.state import AcceleratorState

    from nanoi2v_diffusers.training import precompute_latents, train_dit, train_vae

    mains = {"train_vae.py": train_vae.main, "precompute_latents.py": precompute_latents.main,
             "train_dit.py": train_dit.main}  # fmt: skip
    try:
        mains[script](argv)
    finally:  # the next phase may use another mixed precision
        AcceleratorState._reset_state(reset_partial_state=True)


def _describe(phase: Phase) -> str:
    if phase.is_cache:
        return f"{phase.script}, {phase.settings.get('max_train_samples', 'all')} clips"
    return f"{phase.script}, {phase.settings['max_train_steps']} steps of {phase.settings['train_batch_size']}"


def _eta(remaining: List[Phase], phases: List[Phase]) -> str:
    """Time left for the training phases, at the seconds per step of the finished phases like them (same script,
    frames and batch); caches not counted."""
    rates = {}
    for phase in phases:
        if not phase.is_cache and (phase.output / SUMMARY_FILE).is_file():
            summary = json.loads((phase.output / SUMMARY_FILE).read_text())
            rates[_rate_key(phase)] = summary["train_seconds"] / max(summary["steps"], 1)
    training = [phase for phase in remaining if not phase.is_cache]
    known = [phase for phase in training if _rate_key(phase) in rates]
    minutes = sum(rates[_rate_key(phase)] * phase.settings["max_train_steps"] for phase in known) / 60
    unknown = [phase.name for phase in training if phase not in known]
    text = f"Training left: about {minutes:.0f} min at the rates measured here" if known else "Training left:"
    return text + (f" (not yet measured: {', '.join(unknown)})" if unknown else "")


def _rate_key(phase: Phase) -> tuple:
    return (phase.script, phase.settings.get("num_frames"), phase.settings.get("train_batch_size"))


def parse_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    """`KEY=VALUE` pairs (VALUE read as YAML) -> {key: value}."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"--set takes KEY=VALUE; got {pair!r}.")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path, help="a recipe file, e.g. training/configs/shapes_64_recipe.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="whose settings to use (default: cuda if available)")
    parser.add_argument(
        "--steps_scale", type=float, default=1.0, help="multiply every step count and cache size by this"
    )
    parser.add_argument("--output_dir", help="instead of the recipe's output_dir")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="a setting for every phase that has it"
    )
    parser.add_argument("--launcher", default=sys.executable, help='how to start a phase, e.g. "accelerate launch"')
    args = parser.parse_args(argv)
    if not 0 < args.steps_scale <= 1:
        parser.error(f"--steps_scale must be in (0, 1]; got {args.steps_scale}.")
    return run(
        args.recipe, args.device, args.steps_scale, parse_overrides(args.set), args.launcher.split(), args.output_dir
    )


if __name__ == "__main__":
    main()
