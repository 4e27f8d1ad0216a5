"""Distributed training on this CPU machine: real 2-process DDP runs (full and LoRA), FSDP2 sharding of the
transformer (full and LoRA) on two processes, and the FSDP config built dry.

The 2-process run uses `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`
(gloo); `--cpu --num_processes 2` would silently start one process (see NOTES.md).
"""

import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from training_fixtures import write_tiny_bert, write_tiny_pipeline, write_tiny_vae

from nanoi2v_diffusers.data import ShapesConfig, write_shapes_folder
from nanoi2v_diffusers.models.transformer_nanoi2v import NanoI2VTransformer3DModel
from nanoi2v_diffusers.training.train_dit import TRAIN_LOG
from nanoi2v_diffusers.training.trainer import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "training" / "accelerate_configs"
NUM_PROCESSES = 2
NUM_STEPS = 3
LAUNCH_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_process_ddp_run_on_cpu(tmp_path, lora):
    bert, vae, out = write_tiny_bert(tmp_path / "bert"), write_tiny_vae(tmp_path / "vae"), tmp_path / "run"
    lora_args = []
    if lora:  # only the adapter trains, so only its gradients are all-reduced
        write_tiny_pipeline(tmp_path / "base", {"bert": bert, "vae": vae})
        lora_args = ["--pretrained_transformer", str(tmp_path / "base"), "--lora_rank", "4"]
    else:  # a folder of videos, two of them unreadable: one in each process's half
        videos = write_shapes_folder(tmp_path / "videos", 8, config=ShapesConfig(canvas_size=32, num_frames=5))
        for name in ("clip_00001.mp4", "clip_00005.mp4"):
            (videos / name).write_bytes(b"not a video" * 100)
        lora_args = ["--dataset", "video_folder", "--train_data_dir", str(videos)]
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch",
        "--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(REPO / "tests" / "ddp_probe.py"), "--config", str(REPO / "training" / "configs" / "tiny.yaml"),
        "--output_dir", str(out), "--text_encoder", str(bert), "--pretrained_vae", str(vae),
        "--max_train_steps", str(NUM_STEPS), "--checkpointing_steps", str(NUM_STEPS), "--validation_steps", "100",
        *lora_args,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=tmp_path)
    print(result.stdout[-3000:], result.stderr[-3000:])  # shown on failure
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr  # the DDP teardown fix holds

    facts = [json.loads((out / "rank_facts" / f"rank-{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]
    assert [fact["rank"] for fact in facts] == [0, 1]
    assert all(fact["world_size"] == NUM_PROCESSES and fact["steps"] == NUM_STEPS for fact in facts)
    assert all(fact["distributed_type"] == "DistributedType.MULTI_CPU" for fact in facts)
    seen = [set(fact["clip_hashes"]) for fact in facts]
    assert all(len(fact["clip_hashes"]) == NUM_STEPS * 2 for fact in facts)  # train_batch_size 2 per process
    assert not seen[0] & seen[1], "the two processes trained on overlapping clips"
    assert facts[0]["parameter_fingerprint"] == facts[1]["parameter_fingerprint"]  # gradients were all-reduced

    assert [path.name for path in list_checkpoints(out)] == [f"checkpoint-{NUM_STEPS}"]
    checkpoint = out / f"checkpoint-{NUM_STEPS}"
    assert len(list(checkpoint.glob("model*.safetensors"))) == 1  # the weights, written once by the main process
    rng_states = sorted(path.name for path in checkpoint.glob("random_states_*.pkl"))
    assert rng_states == ["random_states_0.pkl", "random_states_1.pkl"]  # each process saved its own
    records = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert [record["step"] for record in records][:NUM_STEPS] == list(range(1, NUM_STEPS + 1))  # one log, by rank 0
    if not lora:  # each process skipped the bad file of its half; the summary counts both
        assert records[-1]["summary"]["num_bad_video_files"] == 2
    assert (out / ("pytorch_lora_weights.safetensors" if lora else "model_index.json")).is_file()


def test_fsdp_config_fully_shards_and_wraps_each_transformer_block():
    """Build the FSDP plugin exactly as `accelerate launch --config_file fsdp.yaml` would, without GPUs."""
    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIGS / "fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.reshard_after_forward is True  # FSDP2's full shard
    model = NanoI2VTransformer3DModel.from_preset("tiny", num_layers=2, in_channels=9, out_channels=4, text_dim=32)
    assert plugin.transformer_cls_names_to_wrap == model._no_split_modules
    plugin.set_auto_wrap_policy(model)
    wrapped = [name for name, module in model.named_modules()
               if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)]  # fmt: skip
    assert wrapped == ["blocks.0", "blocks.1"]


def _fsdp2_model_and_batch(lora: bool):
    """A tiny trained-looking transformer (optionally with a LoRA adapter on every target) and a batch of 2."""
    from test_transformer import make_inputs, make_model

    torch.manual_seed(0)
    model = make_model().train()
    if lora:
        from peft import LoraConfig

        from nanoi2v_diffusers.training.train_dit import LORA_TARGET_MODULES

        lora_config = LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False)
        model.add_adapter(lora_config)
    torch.manual_seed(1)
    return model, make_inputs(batch=2)


def _flow_loss(model, inputs, rows=slice(None)) -> torch.Tensor:
    latents, timestep, text, condition = (tensor[rows] for tensor in inputs)
    return model(latents, timestep, text, condition=condition).sample.square().mean()


def _fsdp2_gradients(rank: int, lora: bool, out: str) -> None:
    mesh = init_device_mesh("cpu", (NUM_PROCESSES,))
    model, inputs = _fsdp2_model_and_batch(lora)
    for block in model.blocks:  # one unit per block, as training/accelerate_configs/fsdp.yaml wraps
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _flow_loss(model, inputs, slice(rank, rank + 1)).backward()  # each rank its own sample
    grads = {name: param.grad.full_tensor() for name, param in model.named_parameters() if param.grad is not None}
    if rank == 0:
        torch.save(grads, out)


def _fsdp2_worker(rank: int, port: int, lora: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=NUM_PROCESSES)
    try:
        _fsdp2_gradients(rank, lora, out)
        gc.collect()  # no tensor of a gloo work object may outlive the group (as in Trainer.close)
        torch.distributed.barrier()  # every collective of every rank is done
        Path(f"{out}.done-{rank}").touch()
    finally:
        torch.distributed.destroy_process_group()


def _spawn_fsdp2_workers(lora: bool, out: Path) -> None:
    """Run the two ranks. gloo still aborts a process now and then at teardown, after the barrier ("terminate
    called without an active exception": CI saw it on two submissions in a row), which says nothing about the
    sharded gradients: such an abort is forgiven once every rank has passed the barrier, any other is not."""
    try:
        torch.multiprocessing.spawn(_fsdp2_worker, args=(_free_port(), lora, str(out)), nprocs=NUM_PROCESSES)
    except torch.multiprocessing.ProcessExitedException as error:
        finished = all(Path(f"{out}.done-{rank}").is_file() for rank in range(NUM_PROCESSES))
        if not (finished and error.signal_name == "SIGABRT"):
            raise


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_sharded_gradients_equal_one_process(tmp_path, lora):
    """FSDP2 (`fully_shard` per block, as accelerate's FSDP config; gloo on this CPU): the gradients
    gathered from the shards of two processes, each with one sample, equal one process's on both. The
    blocks' memory-saving autograd Functions read weights that FSDP unshards for the block's forward."""
    out = tmp_path / "grads.pt"
    _spawn_fsdp2_workers(lora, out)
    model, inputs = _fsdp2_model_and_batch(lora)
    _flow_loss(model, inputs).backward()
    expected = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    sharded = torch.load(out)
    assert sorted(sharded) == sorted(expected)
    if lora:  # only the adapter trains
        assert expected and all("lora_" in name for name in expected)
    else:
        assert len(expected) == len(list(model.parameters()))
    for name, grad in expected.items():
        torch.testing.assert_close(sharded[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name, distributed_type, processes", [
    ("single_process", "NO", 1), ("multi_gpu", "MULTI_GPU", 8), ("fsdp", "FSDP", 8), ("multi_node", "MULTI_GPU", 16),
])  # fmt: skip
def test_accelerate_configs_are_valid_launch_configs(name, distributed_type, processes):
    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == processes
    launched_as = {"NO": not (args.multi_gpu or args.use_fsdp), "MULTI_GPU": args.multi_gpu, "FSDP": args.use_fsdp}
    assert launched_as[distributed_type]
