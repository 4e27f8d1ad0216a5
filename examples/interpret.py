"""Pictures from inside the model: five PNG figures of the shipped shapes model at work, for the lessons.

    python examples/interpret.py                                   # `make docs-figures`: docs/figures/*.png
    python examples/interpret.py --steps 4 --out /tmp/figures      # quicker, fewer denoising steps
    python examples/interpret.py --model PIPELINE --seed 1 --scene 5   # another model, noise or scene

Writes to `--out`:

- denoising_strip.png: the decoded x0 prediction at each sampling step (a row per step) for one built-in scene;
- cross_attention.png: which video patches read each prompt clause's text tokens (cross-attention weights,
  averaged over heads, blocks and steps), over the generated frames;
- rope_similarity.png: how alike 3D RoPE makes a query at one position and the same query at every other
  position (the dot product of the rotated vectors), one panel per latent frame;
- vae_latents.png: the VAE's latent channels for one clip, each channel of each latent frame as a grey tile;
- guidance_scales.png: one image and prompt under several guidance scales, a row per scale.

Everything runs on the CPU from the local model folder (no downloads); the drawing is PIL + numpy.
"""

import argparse
import io
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model folder is local: never ask the Hub
# Beside a busy process (a training run), OpenMP's default busy-waiting makes small convolutions many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from nanoi2v_diffusers.settings import OneLineErrorParser

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "examples" / "nanoi2v-shapes-64"
DEFAULT_OUT = REPO / "docs" / "figures"
DEFAULT_STEPS = 20  # as `make demo` samples
DEFAULT_SCENE = 2  # validation scene 2 (one of examples/demo.py's): two objects, so two clauses to compare
GUIDANCE = 5.0  # the demo's guidance scale
GUIDANCE_SCALES = (1.0, 3.0, 5.0, 9.0, 25.0)  # figure (v): 1 turns guidance off, 25 is far too much
SHOWN_FRAMES = tuple(range(0, 17, 2))  # pixel frames drawn in the video figures
ROPE_GRID = (5, 16, 16)  # (T', H', W') of the RoPE figure: 17 frames at 256 x 256 (64 x 64 has only 4 x 4)
MAX_STEPS = 100
MAX_STRIP_ROWS = 20  # more steps than this: an evenly spaced 20 of them in the denoising strip
MAX_PNG_BYTES = 280 * 1024

FIGURES = ("denoising_strip.png", "cross_attention.png", "rope_similarity.png", "vae_latents.png",
           "guidance_scales.png")  # fmt: skip

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GAP = 2  # pixels between tiles


# ----------------------------------------------------------------------------------------------- arguments


def _int_in(name: str, low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            rule = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text!r}: {name} must be an integer {rule}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _model_folder(text: str) -> Path:
    path = Path(text)
    if not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a pipeline folder (no model_index.json in it)")
    return path


def _output_folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="interpret.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=_model_folder, default=DEFAULT_MODEL,
                        help="a pipeline folder (default: %(default)s)")
    parser.add_argument("--out", type=_output_folder, default=DEFAULT_OUT,
                        help="where the PNGs go, created if needed (default: %(default)s)")
    parser.add_argument("--steps", type=_int_in("steps", 1, MAX_STEPS), default=DEFAULT_STEPS,
                        help="denoising steps of every sampling run (default: %(default)s)")
    parser.add_argument("--seed", type=_int_in("seed", 0), default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--scene", type=_int_in("scene", 0), default=DEFAULT_SCENE,
                        help="validation scene index; the first scene from it with two objects is drawn "
                             "(default: %(default)s)")  # fmt: skip
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- drawing


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_image(array: np.ndarray, scale: int = 1) -> Image.Image:
    """(H, W, 3) floats in [0, 1] or uint8 -> a PIL image, `scale` times larger (nearest: pixels stay pixels)."""
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale != 1 else image


def _grid(rows: List[List[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str] = (),
          title: str = "", label_width: int = 120) -> Image.Image:  # fmt: skip
    """Tiles in rows (all of one size), a label left of each row, labels above the columns, a title on top."""
    font = _font()
    tile_w, tile_h = rows[0][0].size
    columns = max(len(row) for row in rows)
    top = (16 if title else 0) + (14 if column_labels else 0)
    width = max(label_width + columns * (tile_w + GAP), int(font.getlength(title)) + 8 if title else 0)
    height = top + len(rows) * (tile_h + GAP)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=INK, font=font)
    for j, label in enumerate(column_labels):
        draw.text((label_width + j * (tile_w + GAP) + 2, top - 13), label, fill=INK, font=font)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (tile_h + GAP)
        for line, text in enumerate(label.split("\n")):
            draw.text((4, y + 2 + 12 * line), text, fill=INK, font=font)
        for j, tile in enumerate(row):
            canvas.paste(tile, (label_width + j * (tile_w + GAP), y))
    return canvas


# A colour map without matplotlib (magma-like): piecewise-linear through a few anchors.
_HEAT = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], dtype=np.float32) / 255


def _colour(values: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB floats (..., 3) along the anchors."""
    position = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    weight = (position - low)[..., None]
    return anchors[low] * (1 - weight) + anchors[low + 1] * weight


def _save(image: Image.Image, path: Path) -> Path:
    """A PNG of at most 256 colours, without dithering (flat black tiles with a few colours compress well): median
    cut, or the coarser octree when that would pass `MAX_PNG_BYTES`."""
    for method in (Image.Quantize.MEDIANCUT, Image.Quantize.FASTOCTREE):
        buffer = io.BytesIO()
        image.quantize(colors=256, method=method, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_PNG_BYTES:
            break
    path.write_bytes(buffer.getvalue())
    return path


# ----------------------------------------------------------------------------------------------- the model


class Scene(NamedTuple):
    index: int
    clip: object  # nanoi2v_diffusers.data.ShapesClip
    clauses: List[str]


def load_pipeline(model: Path):
    from nanoi2v_diffusers.cli import load_pipeline as load_for_sampling

    # CPU, float32, the text encoder from the installed package; Euler steps, which the x0 read-out below assumes.
    pipe = load_for_sampling(str(model), solver="euler", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pick_scene(pipe, start: int) -> Scene:
    """The first validation scene from `start` on with two objects (examples/demo.py's way of drawing scenes)."""
    from nanoi2v_diffusers.data import ShapesConfig, render_clip, sample_scene, shapes_split_seed
    from nanoi2v_diffusers.text_encoders import split_clauses

    config = ShapesConfig()
    for index in range(start, start + 100):
        objects = sample_scene(shapes_split_seed("validation", index), config)
        if len(objects) == 2:
            clip = render_clip(objects, config, seed=shapes_split_seed("validation", index))
            separator = pipe.config.get("text_clause_separator")
            clauses = split_clauses(clip.caption, separator) if separator else [clip.caption]
            return Scene(index, clip, clauses)
    raise RuntimeError(f"No two-object validation scene in {start}..{start + 99}.")


def _initial_noise(pipe, clip, seed: int) -> torch.Tensor:
    frames, height, width = clip.video.shape[:3]
    ratio_t, ratio_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    shape = (1, pipe.transformer.config.out_channels, (frames - 1) // ratio_t + 1, height // ratio_s, width // ratio_s)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cross_attention_recorder(store: List[torch.Tensor]):
    """A processor for the cross-attentions (`attn2`) that runs the normal one and keeps its softmax weights."""
    from nanoi2v_diffusers.models.transformer_nanoi2v import NanoI2VAttnProcessor

    class CrossAttentionRecorder(NanoI2VAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                     num_frames=1):  # fmt: skip
            # The same query and key as the processor makes (no RoPE on cross-attention), then softmax(q.k / sqrt(d)).
            query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))).transpose(1, 2)
            key = attn.norm_k(attn.to_k(encoder_hidden_states).unflatten(-1, (attn.heads, -1))).transpose(1, 2)
            logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # (B, heads, N, L)
            if attention_mask is not None:  # (B, 1, 1, L), True = a token to read
                logits = logits.masked_fill(~attention_mask, float("-inf"))
            # The pipeline batches the guidance branches with the conditional (text) branch last.
            store.append(logits.softmax(dim=-1)[-1].mean(dim=0).float())  # (N, L), averaged over heads
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                    num_frames=num_frames)  # fmt: skip

    return CrossAttentionRecorder()


class Probe(NamedTuple):
    x0_latents: torch.Tensor  # (steps, C, T, h, w): the x0 prediction of each step, normalised latents
    sigmas: List[float]  # the noise level each step started from
    video: np.ndarray  # (F, H, W, 3): the pipeline's output
    attention: torch.Tensor  # (N, L): cross-attention weights of the text branch, mean over heads, blocks, steps
    grid: tuple  # (T', H', W') of the video tokens


def run_probe(pipe, scene: Scene, steps: int, seed: int) -> Probe:
    """One sampling run with two probes: a step callback that reads out each step's x0 prediction, and a
    recording processor on every cross-attention."""
    noise = _initial_noise(pipe, scene.clip, seed)
    trajectory = [noise]

    def keep_latents(pipeline, step, timestep, tensors):
        trajectory.append(tensors["latents"].clone())
        return {}

    store: List[torch.Tensor] = []
    original = dict(pipe.transformer.attn_processors)
    recorder = _cross_attention_recorder(store)
    pipe.transformer.set_attn_processor({name: recorder if ".attn2." in name else processor
                                         for name, processor in original.items()})  # fmt: skip
    try:
        video = pipe(image=scene.clip.first_frame, prompt=scene.clip.caption, num_frames=scene.clip.video.shape[0],
                     num_inference_steps=steps, guidance_scale=GUIDANCE, latents=noise.clone(),
                     callback_on_step_end=keep_latents, output_type="np").frames[0]  # fmt: skip
    finally:
        pipe.transformer.set_attn_processor(original)
    # Euler: x_next = x + (sigma_next - sigma) v, so v = (x_next - x) / (sigma_next - sigma) and x0 = x - sigma v.
    sigmas = pipe.scheduler.sigmas.tolist()
    x0 = []
    for i in range(steps):
        velocity = (trajectory[i + 1] - trajectory[i]) / (sigmas[i + 1] - sigmas[i])
        x0.append(trajectory[i] - sigmas[i] * velocity)
    _, _, t, h, w = noise.shape
    p_t, p_h, p_w = pipe.transformer.config.patch_size
    return Probe(torch.cat(x0), sigmas[:steps], np.asarray(video), torch.stack(store).mean(dim=0),
                 (t // p_t, h // p_h, w // p_w))  # fmt: skip


# ----------------------------------------------------------------------------------------------- figures


def denoising_strip(probe: Probe, scene: Scene, pipe) -> Image.Image:
    steps = len(probe.sigmas)
    shown = sorted({round(i * (steps - 1) / (MAX_STRIP_ROWS - 1)) for i in range(MAX_STRIP_ROWS)}) \
        if steps > MAX_STRIP_ROWS else range(steps)  # fmt: skip
    with torch.no_grad():
        x0_videos = pipe.decode_latents(probe.x0_latents[list(shown)], output_type="np")  # (rows, F, H, W, 3)
    rows = [[_to_image(video[f]) for f in SHOWN_FRAMES] for video in x0_videos]
    labels = [f"step {i + 1}\nsigma {probe.sigmas[i]:.2f}" for i in shown]
    rows.append([_to_image(probe.video[f]) for f in SHOWN_FRAMES])
    labels.append("output\n(latent 0\nput back)")
    return _grid(rows, labels, [f"f{f}" for f in SHOWN_FRAMES], title=f"x0 prediction per step: {scene.clip.caption}",
                 label_width=96)  # fmt: skip


def _clause_token_spans(pipe, clauses: List[str]) -> List[slice]:
    """Where each clause's word tokens sit in the joined prompt tokens (`text_encoders.encode_clauses` joins each
    clause's tokens, [CLS] and [SEP] included, in order): the words, without the two special tokens."""
    spans, start = [], 0
    for clause in clauses:
        length = int(pipe.tokenizer(clause, return_tensors="pt").attention_mask.sum())
        spans.append(slice(start + 1, start + length - 1))
        start += length
    return spans


def cross_attention(probe: Probe, scene: Scene, pipe) -> Image.Image:
    t, h, w = probe.grid
    ratio = pipe.vae_scale_factor_temporal
    frames = [min(ratio * k, probe.video.shape[0] - 1) for k in range(t)]  # the last pixel frame of each latent frame
    size = probe.video.shape[1]
    spans = _clause_token_spans(pipe, scene.clauses)
    rows, labels = [], []
    rows.append([_to_image(probe.video[f], 2) for f in frames])
    labels.append("generated\nvideo")
    for clause, span in zip(scene.clauses, spans):
        weights = probe.attention[:, span].sum(dim=-1).reshape(t, h, w).numpy()  # share of attention on the clause
        peak = max(float(weights.max()), 1e-6)
        row = []
        for k, frame in enumerate(frames):
            heat = np.kron(weights[k] / peak, np.ones((size // h, size // w)))  # each token over its pixels
            picture = probe.video[frame].astype(np.float32)
            row.append(_to_image(0.45 * picture + 0.55 * _colour(heat, _HEAT), 2))
        rows.append(row)
        words = clause.split()
        labels.append(" ".join(words[:3]) + "\n" + " ".join(words[3:7]) + f"\npeak {peak:.2f}")
    title = "Cross-attention on each clause's words (text branch; mean of heads, blocks, steps)"
    return _grid(rows, labels, [f"latent {k} (f{f})" for k, f in enumerate(frames)], title=title)


def rope_similarity(pipe) -> Image.Image:
    from nanoi2v_diffusers.models.transformer_nanoi2v import apply_rotary_emb

    t, h, w = ROPE_GRID
    head_dim = pipe.transformer.config.attention_head_dim
    cos, sin = pipe.transformer.rope(ROPE_GRID, torch.device("cpu"), torch.float32)  # (N, 1, D) each
    # One query vector, the same at every position, with equal weight on every channel pair: what is left of
    # q(ref) . q(pos) after the rotations is the mean of cos(frequency * offset), a function of the offset alone.
    query = torch.ones(1, t * h * w, 1, head_dim)
    rotated = apply_rotary_emb(query, cos, sin)[0, :, 0]  # (N, D)
    reference = (t // 2) * h * w + (h // 2) * w + w // 2
    similarity = ((rotated @ rotated[reference]) / head_dim).reshape(t, h, w).numpy()  # 1 at the reference
    low = float(similarity.min())
    tiles = [_to_image(_colour((similarity[k] - low) / (1 - low), _HEAT), 8) for k in range(t)]
    axes = pipe.transformer.rope.axis_dims
    return _grid([tiles], [f"reference:\nlatent frame {t // 2},\nrow {h // 2}, col {w // 2}"],
                 [f"latent frame {k}" for k in range(t)],
                 title=f"3D RoPE: q(ref) . q(pos) / |q|^2 on a {t}x{h}x{w} token grid, {low:.2f} dark .. 1.00 light; "
                       f"head channels (t, h, w) = {axes}")  # fmt: skip


def vae_latents(pipe, scene: Scene) -> Image.Image:
    from nanoi2v_diffusers.data import frames_to_tensor

    vae = pipe.vae
    with torch.no_grad():
        pixels = frames_to_tensor(scene.clip.video)[None]  # (1, 3, T, H, W) in [-1, 1]
        latents = vae.normalize_latents(vae.encode(pixels).latent_dist.mode())[0]  # (C, t, h, w)
    channels, t = latents.shape[:2]
    ratio = vae.temporal_compression_ratio
    scale = scene.clip.video.shape[1] // latents.shape[-1]
    low, high = latents.amin(dim=(1, 2, 3), keepdim=True), latents.amax(dim=(1, 2, 3), keepdim=True)
    grey = ((latents - low) / (high - low).clamp_min(1e-6)).numpy()  # per channel, over the whole clip
    rows, labels = [], []
    for k in range(t):
        frame = min(ratio * k, scene.clip.video.shape[0] - 1)  # the last pixel frame latent frame k holds
        tiles = [_to_image(np.repeat(grey[c, k][..., None], 3, axis=-1), scale) for c in range(channels)]
        rows.append([_to_image(scene.clip.video[frame])] + tiles)
        held = ")" if k == 0 else f",\nwith {frame - ratio + 1}..{frame - 1})"  # latent frame 0 is frame 0 alone
        labels.append(f"latent frame {k}\n(pixel frame {frame}{held}")
    return _grid(rows, labels, ["input"] + [f"ch {c}" for c in range(channels)], label_width=96,
                 title=f"VAE latents {tuple(latents.shape)} of a {scene.clip.video.shape[0]}-frame clip, "
                       "each channel scaled to its own min..max over the clip")  # fmt: skip


def guidance_scales(pipe, scene: Scene, steps: int, seed: int) -> Image.Image:
    from nanoi2v_diffusers.evaluation.shapes_metrics import score_video

    rows, labels = [], []
    for scale in GUIDANCE_SCALES:
        video = pipe(image=scene.clip.first_frame, prompt=scene.clip.caption, num_frames=scene.clip.video.shape[0],
                     num_inference_steps=steps, guidance_scale=scale, latents=_initial_noise(pipe, scene.clip, seed),
                     output_type="np").frames[0]  # fmt: skip
        rows.append([_to_image(video[f]) for f in SHOWN_FRAMES])
        score = score_video(video, scene.clip)  # lesson 6: against the generator's own clip
        labels.append(f"guidance {scale:g}" + (" (off)" if scale == 1 else "")
                      + f"\ndirection {score.direction_accuracy:.2f}\nPSNR {score.video_psnr:.1f} dB")  # fmt: skip
    rows.insert(0, [_to_image(scene.clip.video[f]) for f in SHOWN_FRAMES])
    labels.insert(0, "true clip")
    return _grid(rows, labels, [f"f{f}" for f in SHOWN_FRAMES], label_width=104,
                 title=f"{steps} steps, same noise: {scene.clip.caption}")  # fmt: skip


# ----------------------------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"interpret.py: error: --out {str(args.out)!r}: cannot create the folder ({error})", file=sys.stderr)
        raise SystemExit(2) from None
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    scene = pick_scene(pipe, args.scene)
    probe: Dict[str, Probe] = {}

    def sampled() -> Probe:  # the one sampling run behind figures (i) and (ii)
        if "run" not in probe:
            probe["run"] = run_probe(pipe, scene, args.steps, args.seed)
        return probe["run"]

    jobs = {
        "denoising_strip.png": lambda: denoising_strip(sampled(), scene, pipe),
        "cross_attention.png": lambda: cross_attention(sampled(), scene, pipe),
        "rope_similarity.png": lambda: rope_similarity(pipe),
        "vae_latents.png": lambda: vae_latents(pipe, scene),
        "guidance_scales.png": lambda: guidance_scales(pipe, scene, args.steps, args.seed),
    }
    written = []
    for name in tqdm(FIGURES, desc="Figures", unit="figure"):
        written.append(_save(jobs[name](), args.out / name))
    print(f"Scene {scene.index}: {scene.clip.caption!r}; {args.steps} steps, seed {args.seed}.")
    for path in written:
        print(f"  {path} ({path.stat().st_size / 1024:.0f} KB)")
    return written


if __name__ == "__main__":
    main()
