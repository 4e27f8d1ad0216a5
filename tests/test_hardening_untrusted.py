"""Files from strangers (issue 8): no pickle without an opt-in (and then weights_only), no remote code,
hash-checked text encoder, checkpoints that would unpickle code are refused."""

import ast
import json
import pathlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from training_fixtures import fresh_accelerator_state, single_thread  # noqa: F401

from nanoi2v_diffusers import AutoencoderKLNanoI2V, NanoI2VFlowMatchScheduler, NanoI2VPipeline, NanoI2VTransformer3DModel
from nanoi2v_diffusers import text_encoders
from nanoi2v_diffusers.models.autoencoder_kl_nanoi2v import VAE_PRESETS
from nanoi2v_diffusers.safe_loading import (
    ConfigValidationError,
    UnsafeFileError,
    check_checkpoint_pickles,
    load_state_dict_file,
)
from nanoi2v_diffusers.text_encoders import TextEncoderIntegrityError, verify_minilm
from nanoi2v_diffusers.training.trainer import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("nanoi2v_diffusers", "pipelines", "training", "examples", "benchmarks")
WEIGHTS = "diffusion_pytorch_model"


class PickledCode:
    """Unpickling this touches `marker`: stands for any code a malicious pickle would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"])
    transformer = NanoI2VTransformer3DModel(in_channels=9, out_channels=4, num_layers=1, num_attention_heads=2,
                                            attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32)  # fmt: skip
    folder = tmp_path_factory.mktemp("pipe")
    NanoI2VPipeline(vae=vae, transformer=transformer, scheduler=NanoI2VFlowMatchScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture
def pickled_pipe(saved_pipe, tmp_path):
    """A copy of the pipeline whose transformer weights are only a pickle `.bin` file."""
    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    safetensors = folder / "transformer" / f"{WEIGHTS}.safetensors"
    torch.save(load_file(str(safetensors)), folder / "transformer" / f"{WEIGHTS}.bin")
    safetensors.unlink()
    return folder


# ------------------------------------------------------------------------------------------- pickle weights


def test_pickle_only_weights_are_refused_by_default(pickled_pipe):
    with pytest.raises(UnsafeFileError, match=r"transformer holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        NanoI2VPipeline.from_pretrained(pickled_pipe)
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        NanoI2VTransformer3DModel.from_pretrained(pickled_pipe / "transformer")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "weights.pth"])
def test_other_pickle_formats_are_refused_too(saved_pipe, tmp_path, name):
    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    (folder / "vae" / f"{WEIGHTS}.safetensors").rename(folder / "vae" / name)
    with pytest.raises(UnsafeFileError, match=f"vae holds only pickle weights \\({name}\\)"):
        NanoI2VPipeline.from_pretrained(folder)


def test_opt_in_loads_pickle_weights_with_weights_only(pickled_pipe, saved_pipe):
    expected = load_file(str(saved_pipe / "transformer" / f"{WEIGHTS}.safetensors"))
    for loaded in (NanoI2VPipeline.from_pretrained(pickled_pipe, allow_pickle=True).transformer,
                   NanoI2VTransformer3DModel.from_pretrained(pickled_pipe / "transformer", allow_pickle=True)):  # fmt: skip
        state = loaded.state_dict()
        assert all(torch.equal(state[name], value) for name, value in expected.items())


def test_opt_in_still_refuses_pickled_code(pickled_pipe, tmp_path):
    marker = tmp_path / "code-ran"
    weights = pickled_pipe / "transformer" / f"{WEIGHTS}.bin"
    torch.save({**torch.load(weights, weights_only=True), "payload": PickledCode(marker)}, weights)
    with pytest.raises(OSError, match="Unable to load weights"):
        NanoI2VPipeline.from_pretrained(pickled_pipe, allow_pickle=True)
    assert not marker.exists()


def test_hub_downloads_are_checked_like_local_folders(saved_pipe, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    folder = shutil.copytree(saved_pipe, tmp_path / "snapshot")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))  # diffusers loads it
    # diffusers' download, offline: the "repo" snapshot is the tampered folder.
    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(lambda cls, name, **kwargs: str(folder)))
    with pytest.raises(ConfigValidationError, match="'_class_name' is 'WanPipeline'"):
        NanoI2VPipeline.from_pretrained("someone/nanoi2v-tampered")


def test_load_state_dict_file(tmp_path):
    tensors = {"weight": torch.arange(4.0)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.bin")
    assert torch.equal(load_state_dict_file(tmp_path / "w.safetensors")["weight"], tensors["weight"])
    with pytest.raises(UnsafeFileError, match="w.bin is a pickle file"):
        load_state_dict_file(tmp_path / "w.bin")
    assert torch.equal(load_state_dict_file(tmp_path / "w.bin", allow_pickle=True)["weight"], tensors["weight"])
    marker = tmp_path / "code-ran"
    torch.save({"payload": PickledCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state_dict_file(tmp_path / "evil.ckpt", allow_pickle=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- remote code


def test_loads_without_trust_remote_code_and_refuses_it(saved_pipe):
    assert isinstance(NanoI2VPipeline.from_pretrained(saved_pipe), NanoI2VPipeline)
    for kwargs in ({"trust_remote_code": True}, {"custom_pipeline": "my_pipeline.py"}):
        with pytest.raises(UnsafeFileError, match="never runs code shipped with a model"):
            NanoI2VPipeline.from_pretrained(saved_pipe, **kwargs)
    with pytest.raises(UnsafeFileError, match="trust_remote_code"):
        NanoI2VTransformer3DModel.from_pretrained(saved_pipe / "transformer", trust_remote_code=True)


def test_model_index_cannot_import_other_modules(saved_pipe, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["planted_module", "Model"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigValidationError, match="names library 'planted_module'; only modules of"):
        NanoI2VPipeline.from_pretrained(folder)
    assert not marker.exists() and "planted_module" not in sys.modules


def _risky_keywords(path: Path):
    """(line, keyword) of every `trust_remote_code=True` or `weights_only=False` argument in a Python file."""
    risky = {("trust_remote_code", True), ("weights_only", False)}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
            if (node.arg, node.value.value) in risky:
                yield node.lineno, f"{node.arg}={node.value.value}"


def test_no_source_file_enables_remote_code_or_unsafe_unpickling():
    files = [path for folder in SOURCE_DIRS for path in (REPO / folder).rglob("*.py")]
    assert len(files) > 20
    found = [f"{path.relative_to(REPO)}:{line} {keyword}" for path in files for line, keyword in _risky_keywords(path)]
    assert found == []


# ------------------------------------------------------------------------------------------- text encoder hash


def test_builtin_text_encoder_matches_the_pinned_hash():
    assert verify_minilm() == text_encoders.minilm_path()


def test_tampered_text_encoder_is_refused_before_loading(tmp_path, monkeypatch):
    copy = shutil.copytree(text_encoders.minilm_path(), tmp_path / "minilm")
    weights = copy / text_encoders.MINILM_WEIGHTS
    with open(weights, "r+b") as handle:  # flip one byte in the middle of the tensors
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(TextEncoderIntegrityError, match="expected the pinned"):
        verify_minilm(copy)
    monkeypatch.setattr(text_encoders, "minilm_path", lambda: copy)
    monkeypatch.setattr(text_encoders.AutoModel, "from_pretrained", pytest.fail)  # must never get this far
    with pytest.raises(TextEncoderIntegrityError):
        text_encoders.load_minilm()
    weights.unlink()
    with pytest.raises(TextEncoderIntegrityError, match="is missing"):
        verify_minilm(copy)


# ------------------------------------------------------------------------------------------- training checkpoints


def _checkpoint_with_ema(folder: Path) -> Accelerator:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    accelerator.register_for_checkpointing(EMAModel(model.parameters()))
    accelerator.save_state(str(folder))
    return accelerator


def test_checkpoint_that_would_unpickle_code_is_refused(tmp_path):
    accelerator = _checkpoint_with_ema(tmp_path / "checkpoint-1")
    check_checkpoint_pickles(tmp_path / "checkpoint-1")  # a real EMA state holds only tensors and numbers
    marker = tmp_path / "code-ran"
    ema_file = tmp_path / "checkpoint-1" / "custom_checkpoint_0.pkl"
    torch.save({"decay": 0.99, "payload": PickledCode(marker)}, ema_file)
    with pytest.raises(UnsafeFileError, match="custom_checkpoint_0.pkl does not load with torch.load"):
        load_checkpoint(accelerator, tmp_path / "checkpoint-1")
    assert not marker.exists()
