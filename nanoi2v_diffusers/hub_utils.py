"""Model card and Hub upload for saved pipeline folders.

`write_model_card` fills a `huggingface_hub.ModelCard` with the metadata the Hub reads
(`library_name: diffusers`, `pipeline_tag: image-to-video`) and a usage snippet; `push_to_hub`
checks the folder is complete, then uploads it with `create_repo` + `upload_folder`. A folder is a
saved pipeline, or LoRA weights for one (`pytorch_lora_weights.safetensors`, as diffusers' LoRA
training scripts write).
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import yaml
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from .safe_loading import MODEL_INDEX, PICKLE_SUFFIXES

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
{text_encoder_note}
{samples}
{metrics}
{training}
"""


def write_model_card(
    folder: PathLike,
    *,
    repo_id: Optional[str] = None,
    title: str = "NanoI2V",
    description: str = "",
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    tags: Iterable[str] = (),
    base_model: Optional[str] = None,
    training_config: Optional[Mapping] = None,
    metrics: Optional[Mapping[str, float]] = None,
    sample_videos: Sequence[PathLike] = (),
    text_encoder_hint: Optional[str] = None,
    lora_base_model: Optional[str] = None,
) -> ModelCard:
    """Write `folder/README.md`, a Hub model card for the pipeline saved in `folder`.

    Args:
        folder: a folder written by `NanoI2VPipeline.save_pretrained`.
        repo_id: the Hub id shown in the usage snippet (the folder path when None).
        title, description: the card's heading and first paragraph.
        license, datasets, tags, base_model: card metadata.
        training_config: shown as YAML under "Training" (e.g. the training script's config).
        metrics: shown as a table under "Evaluation".
        sample_videos: GIF/MP4 files copied into `folder/samples/` and embedded.
        text_encoder_hint: Python expression(s) passed to `from_pretrained` when the text encoder is not
            stored in the folder, e.g. "text_encoder=text_encoder, tokenizer=tokenizer".
        lora_base_model: when `folder` holds LoRA weights, the pipeline (Hub id or folder) they load into;
            it becomes the card's `base_model` and the snippet loads it, then the weights.
    Returns:
        The `ModelCard`, already saved.
    """
    folder = Path(folder)
    repo_id = repo_id or str(folder)
    text_encoder_args = f", {text_encoder_hint}" if text_encoder_hint else ""
    load_pipeline = f'pipe = NanoI2VPipeline.from_pretrained("{repo_id}"{text_encoder_args})'
    if lora_base_model is not None:
        tags, base_model = {*tags, "lora"}, lora_base_model
        load_pipeline = (f'pipe = NanoI2VPipeline.from_pretrained("{lora_base_model}"{text_encoder_args})\n'
                         f'pipe.load_lora_weights("{repo_id}")')  # fmt: skip
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        datasets=list(datasets) or None,
        tags=sorted(set(DEFAULT_TAGS) | set(tags)),
        base_model=base_model,
    )
    content = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=title,
        description=description,
        load_pipeline=load_pipeline,
        text_encoder_note=_text_encoder_note(text_encoder_hint),
        samples=_samples_section(folder, sample_videos),
        metrics=_metrics_section(metrics),
        training=_training_section(training_config),
    )
    card = ModelCard(content)
    card.save(folder / "README.md")
    return card


def _text_encoder_note(hint: Optional[str]) -> str:
    if not hint:
        return ""
    return (
        "\nThe text encoder is not stored in this repository; build it first and pass it in "
        f"(`{hint}`).\n"
    )


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
    rows = [f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |" for name, value in metrics.items()]
    return "\n".join(["## Evaluation", "", "| metric | value |", "| --- | --- |", *rows]) + "\n"


def _training_section(training_config: Optional[Mapping]) -> str:
    if not training_config:
        return ""
    as_yaml = yaml.safe_dump(json.loads(json.dumps(dict(training_config), default=str)), sort_keys=False)
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
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token)
    return str(commit)


def publish_folder(folder: PathLike, repo_id: str, private: bool = False) -> str:
    """Push the pipeline (or LoRA) files of a training run's `folder` (not its checkpoints, logs or validation
    videos) to the Hub; returns the commit URL."""
    folder = Path(folder)
    names = ["README.md", SAMPLES_DIR]
    if (folder / LORA_WEIGHT_NAME).is_file():
        names.append(LORA_WEIGHT_NAME)
    else:
        index = json.loads((folder / MODEL_INDEX).read_text())
        names += [MODEL_INDEX, *(name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None)]
    with tempfile.TemporaryDirectory() as staging:
        for name in names:
            source, target = folder / name, Path(staging) / name
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.is_file():
                shutil.copy2(source, target)
        return push_to_hub(staging, repo_id, private=private)
