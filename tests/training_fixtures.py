"""Tiny, local stand-ins for the training tests: a random BERT text encoder, a random tiny VAE and a
tiny pipeline built from them.

Nothing is downloaded: the BERT is built from a `BertConfig` and a written `vocab.txt`.
"""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from nanoi2v_diffusers import NanoI2VPipeline
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.text_encoders import load_text_encoder, save_tiny_random_text_encoder


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) and its word-level tokenizer, saved as safetensors."""
    return save_tiny_random_text_encoder(folder, hidden_size=32, num_layers=2, seed=seed)


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A random "tiny" VAE (4 latent channels, 8x spatial, 4x temporal compression), saved."""
    torch.manual_seed(seed)
    AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"]).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run on one thread: with both cores busy, two OpenMP threads made the tiny VAE's
    convolutions about 60x slower here (spin-waiting), and one thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Forget the process-wide accelerate state after each in-process run (as accelerate's own test
    cases do), so that the next run may use another mixed precision."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


TINY_DIT_CONFIG = Path(__file__).resolve().parent.parent / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random BERT and VAE on disk, shared by the tests of one module."""
    root = tmp_path_factory.mktemp("assets")
    return {"bert": write_tiny_bert(root / "bert"), "vae": write_tiny_vae(root / "vae")}


def tiny_dit_argv(output_dir: Path, assets, *extra: str) -> list:
    """train_dit.py arguments for the tiny config with the tiny BERT and VAE of the `assets` fixture."""
    return ["--config", str(TINY_DIT_CONFIG), "--output_dir", str(output_dir), "--text_encoder", str(assets["bert"]),
            "--pretrained_vae", str(assets["vae"]), *extra]  # fmt: skip


def write_tiny_pipeline(folder: Path, assets) -> NanoI2VPipeline:
    """A complete pipeline of the tiny config's sizes, with the `assets` BERT and VAE and a random transformer
    with non-zero weights (adaLN-Zero's zero outputs would hide an adapter): a LoRA run's base. Saved to `folder`."""
    from nanoi2v_diffusers.settings import parse_config
    from nanoi2v_diffusers.training import train_dit

    config = parse_config(train_dit.DiTTrainingConfig, tiny_dit_argv(folder, assets))
    vae = AutoencoderKLNanoI2V.from_pretrained(assets["vae"])
    text_encoder, tokenizer = load_text_encoder(str(assets["bert"]))
    torch.manual_seed(0)
    transformer = train_dit.build_transformer(config, vae.config.latent_channels, text_encoder.config.hidden_size)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.normal_(std=0.05)
    pipe = NanoI2VPipeline(vae=vae, transformer=transformer, scheduler=train_dit.build_noise_scheduler(config),
                           text_encoder=text_encoder, tokenizer=tokenizer)  # fmt: skip
    pipe.save_pretrained(folder)
    return pipe
