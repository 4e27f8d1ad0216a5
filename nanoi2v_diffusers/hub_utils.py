"""Model card and Hub upload for saved pipeline folders.

`write_model_card` fills a `huggingface_hub.ModelCard` with the metadata the Hub reads
(`library_name: diffusers`, `pipeline_tag: image-to-video`) and a usage snippet; `push_to_hub`
checks the folder is complete, then uploads it with `create_repo` + `upload_folder`. A folder is a
saved pipeline, or LoRA weights for one (`pytorch_lora_weights.safetensors`, as diffusers' LoRA
training scripts write).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import yaml
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from .safe_loading import MODEL_INDEX, PICKLE_SUFFIXES, hub_unreachable

PathLike = Union[str, Path]

PIPELINE_TAG = "image-to-video"
DEFAULT_TAGS = ("diffusers", "image-to-video", "text-to-video", "video-generation", "nanoi2v", "flow-matching")
SAMPLES_DIR = "samples"
WEIGHT_SUFFIX = ".safetensors"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' save/load_lora_weights use

CARD_TEMPLATE = """---
{card_data}
---

# {title}

{description}

An image-to-video diffusion pipeline built with `nanoi2v_diffusers` (install it from its repository with `pip install -e .`):
a causal 3D VAE, a diffusion transformer with 3D RoPE, cross-attention to text and adaLN-Zero, and a
flow-matching scheduler. Given a first frame and a prompt it generates a video; without an image it
does text-to-video.

## Usage

```python
import torch
from PIL import Image
from nanoi2v_diffusers import NanoI2VPipeline
from nanoi2v_diffusers.data import write_video

{load_pipeline}
video = pipe(image=Image.open("first_frame.png"), prompt="a red circle moves left",
             num_frames=17, num_inference_steps=20, guidance_scale=5.0,
             generator=torch.manual_seed(0)).frames[0]          # (F, H, W, 3) floats in [0, 1]
write_video("out.mp4", (video * 255).round().astype("uint8"), fps=8)
```

Or from the command line: `nanoi2v generate --model {model} --image first_frame.png --prompt "a red circle moves left"`.
{samples}
{metrics}
{training}
"""


def write_model_card(
    folder: PathLike,
    *,
    repo_id: Optional[str] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    tags: Iterable[str] = (),
    base_model: Optional[str] = None,
    training_config: Optional[Mapping] = None,
    metrics: Optional[Mapping[str, float]] = None,
    sample_videos: Sequence[PathLike] = (),
    lora_base_model: Optional[str] = None,
) -> ModelCard:
    """Write `folder/README.md`, a Hub model card for the pipeline (or LoRA weights) saved in `folder`.

    Args:
        folder: a folder written by `NanoI2VPipeline.save_pretrained` (or holding LoRA weights for a pipeline).
        repo_id: the Hub id the usage snippet loads; None: the folder itself, by its name (run the snippet
            beside it). No absolute local path is written into the card.
        title, description: the heading and first paragraph; by default the folder's name and what its
            configs say (the models' sizes, the text encoder).
        license, datasets, tags, base_model: card metadata. Datasets and the base model go into the metadata
            only as Hub ids; a local path is named in the text instead.
        training_config: shown as YAML under "Training" (absolute paths shortened to their last part).
        metrics: shown as a table under "Evaluation".
        sample_videos: GIF/MP4 files copied into `folder/samples/` and embedded.
        lora_base_model: when `folder` holds LoRA weights, the pipeline (Hub id or folder) they load into: the
            snippet loads it, then the weights.
    Returns:
        The `ModelCard`, already saved.
    """
    folder = Path(folder)
    model = repo_id or folder.name
    load = f'pipe = NanoI2VPipeline.from_pretrained("{model}")'
    notes = []
    if lora_base_model is not None:
        tags = {*tags, "lora"}
        base = str(lora_base_model) if _is_hub_id(lora_base_model) else Path(lora_base_model).name
        base_model = base if _is_hub_id(lora_base_model) else None
        load = f'pipe = NanoI2VPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{model}")'
        if base_model is None:
            notes.append(f"LoRA weights for the local pipeline folder `{base}` (not on the Hub).")
    elif base_model is not None and not _is_hub_id(base_model):
        notes.append(f"Fine-tuned from the local pipeline folder `{Path(base_model).name}`.")
        base_model = None
    local_data = [name for name in datasets if not _is_hub_id(name)]
    if local_data:
        notes.append(f"Trained on local data: {', '.join(f'`{Path(name).name}`' for name in local_data)}.")
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        datasets=[name for name in datasets if _is_hub_id(name)] or None,
        tags=sorted(set(DEFAULT_TAGS) | set(tags)),
        base_model=base_model,
    )
    description = description if description is not None else describe_folder(folder)
    content = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=title or f"NanoI2V ({folder.name})",
        description=" ".join([description, *notes]).strip(),
        load_pipeline=load,
        model=model,
        samples=_samples_section(folder, sample_videos),
        metrics=_metrics_section(metrics),
        training=_training_section(training_config),
    )
    card = ModelCard(content)
    card.save(folder / "README.md")
    return card


def _is_hub_id(name: PathLike) -> bool:
    """Whether `name` reads as a Hub repo id (user/name) and is not a local path."""
    text = str(name)
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def describe_folder(folder: PathLike) -> str:
    """What a saved pipeline folder holds, in one paragraph, from its configs (empty for anything else)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        dit = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    width = dit["num_attention_heads"] * dit["attention_head_dim"]
    text = (f"A causal 3D VAE with {vae['latent_channels']} latent channels and {len(vae['block_out_channels'])} "
            f"levels (channels {', '.join(map(str, vae['block_out_channels']))}), and a diffusion transformer of "
            f"{dit['num_layers']} layers of width {width} ({dit['num_attention_heads']} heads), patch "
            f"{'x'.join(map(str, dit['patch_size']))}, reading text states of {dit['text_dim']} features.")  # fmt: skip
    if index.get("default_text_encoder"):
        text += (f" The text encoder is the package's built-in {index['default_text_encoder']}: not stored here, "
                 "`from_pretrained` loads it from the installed package.")  # fmt: skip
    elif index.get("text_encoder", [None])[0]:
        text += f" The text encoder ({index['text_encoder'][1]}) is stored with it."
    if index.get("input_domain") == "shapes":
        text += (" Trained on the built-in synthetic shapes clips: 64 x 64 coloured circles, squares and triangles "
                 "on black, moving as English captions like 'the red circle moves left' say, over 17 frames.")
    return text


def _samples_section(folder: Path, sample_videos: Sequence[PathLike]) -> str:
    if not sample_videos:
        return ""
    (folder / SAMPLES_DIR).mkdir(exist_ok=True)
    lines = ["## Samples", ""]
    for video in map(Path, sample_videos):
        target = folder / SAMPLES_DIR / video.name
        if video.resolve() != target.resolve():
            shutil.copyfile(video, target)
        lines.append(f"![{video.stem}]({SAMPLES_DIR}/{video.name})")
    return "\n".join(lines) + "\n"


def _metrics_section(metrics: Optional[Mapping[str, float]]) -> str:
    if not metrics:
        return ""
    rows = [f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in metrics.items()]  # fmt: skip
    return "\n".join(["## Evaluation", "", "| metric | value |", "| --- | --- |", *rows]) + "\n"


def _training_section(training_config: Optional[Mapping]) -> str:
    if not training_config:
        return ""
    values = json.loads(json.dumps(dict(training_config), default=str))
    values = {key: Path(value).name if isinstance(value, str) and os.path.isabs(value) else value
              for key, value in values.items()}  # no local absolute paths in a card meant to be published
    as_yaml = yaml.safe_dump(values, sort_keys=False)
    return f"## Training\n\n```yaml\n{as_yaml}```\n"


def is_pipeline_folder(folder: PathLike) -> bool:
    """Whether `folder` holds a saved pipeline (a `model_index.json`)."""
    return (Path(folder) / MODEL_INDEX).is_file()


def check_pipeline_folder(folder: PathLike) -> Dict[str, Path]:
    """Check `folder` is a complete, pickle-free pipeline folder, or LoRA weights for one, with a model card;
    return {component: folder} (empty for LoRA weights).

    Raises ValueError naming the missing file, or the pickle file found.
    """
    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    if not is_pipeline_folder(folder):
        if (folder / LORA_WEIGHT_NAME).is_file():
            _check_card_and_pickles(folder)
            return {}  # LoRA weights for a pipeline published elsewhere: no components of its own
        raise ValueError(f"{folder} is not a pipeline folder: {index_path.name} is missing.")
    index = json.loads(index_path.read_text())
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        component_dir = folder / name
        if not component_dir.is_dir():
            raise ValueError(f"{index_path} lists component {name!r} but {component_dir} is missing.")
        components[name] = component_dir
    for name, component_dir in components.items():
        if (component_dir / "config.json").is_file() and not any(component_dir.glob(f"*{WEIGHT_SUFFIX}")):
            raise ValueError(f"Component {name!r} in {component_dir} has a config.json but no {WEIGHT_SUFFIX} weights.")
    _check_card_and_pickles(folder)
    return components


def _check_card_and_pickles(folder: Path) -> None:
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{folder} holds pickle weight files ({pickles[0]}); only safetensors are published.")
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no README.md model card: call write_model_card first.")


def push_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload NanoI2V pipeline",
) -> str:
    """Upload a saved pipeline folder (with its model card) to the Hub; returns the commit URL."""
    check_pipeline_folder(folder)
    try:
        create_repo(repo_id, private=private, token=token, exist_ok=True)
        commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token)
    except Exception as error:
        raise RuntimeError(f"Could not push {folder} to the Hub repo {repo_id!r}: {_push_failure(error)} The folder "
                           "is saved locally; push it again once that is fixed.") from error  # fmt: skip
    return str(commit)


def _push_failure(error: BaseException) -> str:
    """Why a push failed, in words: offline, no connection, or not logged in / no write access."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set (unset it to push)."
    if hub_unreachable(error):
        return f"the Hub could not be reached ({type(error).__name__}); check the network."
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Hub refused it (HTTP {status}): log in with `hf auth login` (or set HF_TOKEN) with write access."
    return f"{type(error).__name__}: {error}."


def publish_folder(folder: PathLike, repo_id: str, private: bool = False) -> str:
    """Push the pipeline (or LoRA) files of a training run's `folder` (not its checkpoints, logs or validation
    videos) to the Hub; returns the commit URL."""
    folder = Path(folder)
    names = ["README.md", SAMPLES_DIR]
    if (folder / LORA_WEIGHT_NAME).is_file():
        names.append(LORA_WEIGHT_NAME)
    else:
        index = json.loads((folder / MODEL_INDEX).read_text())
        components = [name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None]
        names += [MODEL_INDEX, *components]
    with tempfile.TemporaryDirectory() as staging:
        for name in names:
            source, target = folder / name, Path(staging) / name
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.is_file():
                shutil.copy2(source, target)
        return push_to_hub(staging, repo_id, private=private)
