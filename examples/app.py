"""A web app for a NanoI2V pipeline (Gradio): a first frame and a prompt in, a video out.

    python examples/app.py --model examples/nanoi2v-shapes-64 --port 7860      # `make app`, then open the address

Upload a first frame or pick a built-in scene, type the motion, set the steps, guidance and seed (and, if you
like, the last frame), and press Generate: the video plays in the page, with a progress bar while it is made,
and downloads as MP4 or GIF. Runs on a CPU (a 64 x 64 video of the built-in model in about a second).

The page's Generate is also an API endpoint, `/generate`: (first frame, prompt, steps, guidance, seed[, last
frame]) -> the MP4. With gradio_client:

    from gradio_client import Client, handle_file
    result = Client("http://127.0.0.1:7860/").predict(handle_file("first.png"), "a red circle moves left", 20, 5.0,
                                                      0, api_name="/generate")   # {"video": path to the MP4, ...}

Bad input (neither a first frame nor a prompt, frames of two sizes, ...) shows a message in the page, not a
stack trace. Nothing is downloaded or sent anywhere: Gradio's analytics are off.
"""

import argparse
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # set before gradio is imported: nothing leaves the machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from nanoi2v_diffusers.cli import load_pipeline, video_to_uint8  # noqa: E402
from nanoi2v_diffusers.data import ShapesConfig, render_clip, sample_scene, shapes_split_seed, write_video  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "examples" / "nanoi2v-shapes-64"
NUM_BUILT_IN_SCENES = 8
FPS = 8
PIPELINE_LOGGER = "nanoi2v_diffusers.pipelines.pipeline_nanoi2v"


def built_in_scenes(count: int = NUM_BUILT_IN_SCENES) -> Dict[str, Tuple[np.ndarray, str]]:
    """{label: (first frame (H, W, 3) uint8, caption)} of shapes validation scenes (never seen in training)."""
    config, scenes = ShapesConfig(), {}
    for index in range(count):
        clip = render_clip(sample_scene(shapes_split_seed("validation", index), config), config)
        scenes[f"scene {index}: {clip.caption}"] = (clip.first_frame, clip.caption)
    return scenes


class _CollectWarnings(logging.Handler):
    """The pipeline's warnings during one call (e.g. an input unlike the model's training data), for the page."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def make_generate(pipe, output_dir: Path, size: int, gifs: Optional[Dict[str, str]] = None):
    """The Generate handler: checks the inputs, runs the pipeline, writes the MP4 and the GIF, returns the MP4
    (and records the GIF in `gifs` under the MP4's file name, which Gradio keeps when it serves a copy)."""

    def generate(image: Optional[Image.Image], prompt: str, num_inference_steps: float, guidance_scale: float,
                 seed: float, last_image: Optional[Image.Image] = None,
                 progress=gr.Progress(track_tqdm=True)) -> str:  # fmt: skip
        prompt = (prompt or "").strip()
        if image is None and last_image is None and not prompt:
            raise gr.Error("Give a first frame (upload one or pick a built-in scene), a prompt, or both.")
        if seed is None or seed < 0 or seed != int(seed):
            raise gr.Error(f"The seed must be a whole number >= 0; got {seed}.")
        for name, frame in (("first frame", image), ("last frame", last_image)):
            if frame is not None and frame.size != (size, size):
                gr.Warning(f"The {name} ({frame.width}x{frame.height}) is resized to cover {size}x{size} and "
                           f"center-cropped: this model makes {size} x {size} videos.")  # fmt: skip
        collected = _CollectWarnings()
        logging.getLogger(PIPELINE_LOGGER).addHandler(collected)
        try:
            frames = pipe(
                image=image, last_image=last_image, prompt=prompt or None, height=size, width=size,
                num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
                generator=torch.Generator().manual_seed(int(seed)),
            ).frames[0]  # (F, H, W, 3) in [0, 1]  # fmt: skip
        except (ValueError, OSError) as error:  # the pipeline's one-line errors, shown as they are
            raise gr.Error(str(error)) from None
        finally:
            logging.getLogger(PIPELINE_LOGGER).removeHandler(collected)
        for message in collected.messages:
            gr.Warning(message)
        video, name = video_to_uint8(frames), f"nanoi2v-{uuid.uuid4().hex[:12]}"
        if gifs is not None:
            gifs[f"{name}.mp4"] = str(write_video(output_dir / f"{name}.gif", video, fps=FPS))
        return str(write_video(output_dir / f"{name}.mp4", video, fps=FPS))

    return generate


def build_app(pipe, output_dir: Optional[Path] = None, size: int = 64) -> gr.Blocks:
    """The page: inputs on the left, the video and its downloads on the right."""
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="nanoi2v-app-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    scenes, gifs = built_in_scenes(), {}
    with gr.Blocks(title="NanoI2V: image to video") as app:
        gr.Markdown("# NanoI2V: image to video\nA first frame and a prompt in, a video out. The built-in model knows "
                    "coloured circles, squares and triangles on black, moving as its captions say.")  # fmt: skip
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"], label="First frame",
                                 elem_id="first-frame")
                scene = gr.Dropdown(list(scenes), value=None, label="... or a built-in scene", elem_id="scene")
                prompt = gr.Textbox(label="Prompt", placeholder="the red circle moves left", elem_id="prompt")
                with gr.Row():
                    steps = gr.Slider(1, 50, value=20, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 10.0, value=5.0, step=0.5, label="Guidance")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                last_image = gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                      label="Last frame (optional)", elem_id="last-frame")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, elem_id="video")
                gif = gr.File(label="GIF", interactive=False, elem_id="gif")
        scene.change(lambda label: scenes[label] if label else (None, ""), scene, [image, prompt], api_name=False)
        button.click(make_generate(pipe, output_dir, size, gifs), [image, prompt, steps, guidance, seed, last_image],
                     video, api_name="generate").then(lambda path: gifs.get(Path(path).name) if path else None, video,
                                                      gif, api_name=False)  # fmt: skip
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a pipeline folder or Hub id")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--size", type=int, default=64, help="height and width of the videos (the model's size)")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    build_app(pipe, size=args.size).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
