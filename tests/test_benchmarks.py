"""Smoke tests of the benchmark scripts: each main() at its smallest setting, and the measuring helpers.

No timing is asserted: only the structure of the tables and JSON, and what the instrumentation counts.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling `_measure` as run from that folder

import _measure  # noqa: E402
import bench_cpu_malloc  # noqa: E402
import bench_models  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_train_gpu  # noqa: E402
import bench_vae_memory  # noqa: E402
import keyframe_placement  # noqa: E402
from nanoi2v_diffusers.text_encoders import load_text_encoder, save_tiny_random_text_encoder  # noqa: E402

MIB = 2**20
TINY_VIDEO = "5x32x32"  # 2 latent frames of 4 x 4: 8 DiT tokens


def _table_lines(text: str, first_header: str):
    """The markdown table starting at the header whose first column is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


# --------------------------------------------------------------------------------------------------
# _measure
# --------------------------------------------------------------------------------------------------


def test_time_interleaved_alternates_order_and_counts_calls():
    calls = []
    candidates = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = _measure.time_interleaved(candidates, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B / B A / A B
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    assert _measure.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # ratios 2, 3, 3
    assert math.isnan(_measure.median([]))


def test_peak_memory_sees_a_large_allocation():
    size_mib = 64
    with _measure.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(size_mib * MIB // 4)  # float32, every page written
        del block
    assert memory.growth_mib >= 0.9 * size_mib


def test_markdown_table_formats_and_aligns():
    rows = [{"name": "x", "value": 1.234}, {"name": "y", "value": None}]
    table = _measure.markdown_table(rows, (("name", "name", ""), ("value", "value", ".1f"))).splitlines()
    assert table == ["| name | value |", "|---|---:|", "| x | 1.2 |", "| y | - |"]


# --------------------------------------------------------------------------------------------------
# bench_models
# --------------------------------------------------------------------------------------------------


def test_bench_models_smoke(tmp_path, capsys):
    out = tmp_path / "models.json"
    rows = bench_models.main([
        "--dit_sizes", "tiny", "--dit_videos", TINY_VIDEO, "--vae_sizes", "tiny", "--vae_videos", TINY_VIDEO,
        "--repeats", "1", "--warmup", "0", "--no_memory", "--out", str(out),
    ])  # fmt: skip
    assert [(r["family"], r["op"]) for r in rows] == [
        ("dit", "forward"), ("dit", "forward+backward"), ("vae", "encode"), ("vae", "decode"), ("vae", "encode+decode")
    ]  # fmt: skip
    for row in rows:
        # Matched sizes: Wan's config is derived from ours, so the parameter counts agree to within 10%.
        assert row["params_wan_m"] == pytest.approx(row["params_ours_m"], rel=0.1)
        assert row["speedup"] > 0 and math.isfinite(row["speedup"])
    assert rows[0]["tokens"] == 8
    encode, decode, both = rows[2:]
    assert both["ours_ms"] == pytest.approx(encode["ours_ms"] + decode["ours_ms"])  # one repeat: sum of the two

    saved = json.loads(out.read_text())
    assert saved["meta"]["repeats"] == 1 and saved["meta"]["device"] == "cpu"
    assert [r["op"] for r in saved["rows"]] == [r["op"] for r in rows]
    table = _table_lines(capsys.readouterr().out, "model")
    assert len(table) == 2 + len(rows)
    assert table[0].count("|") == len(bench_models.COLUMNS) + 1


def test_bench_models_rejects_an_invalid_video():
    with pytest.raises(ValueError, match="nearest valid is 17"):
        bench_models.main(["--dit_sizes", "tiny", "--dit_videos", "16x64x64", "--vae_sizes", "--no_memory"])


def test_profile_warms_both_models_before_profiling_either(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench_models, "build_model", lambda family, kind, size: torch.nn.Identity())
    monkeypatch.setattr(
        bench_models, "model_ops",
        lambda family, kind, *args: {"forward+backward": lambda: calls.append(kind)},
    )  # fmt: skip
    args = bench_models.parse_args(["--profile", f"dit:tiny:{TINY_VIDEO}", "--device", "cpu"])
    bench_models.profile(args, args.profile, steps=2)
    assert calls == ["ours", "wan", "ours", "ours", "wan", "wan"]  # one warm-up each, then the profiled calls
    out = capsys.readouterr().out
    assert f"## ours: dit tiny, video {TINY_VIDEO}" in out and f"## wan: dit tiny, video {TINY_VIDEO}" in out


def test_saved_activations_counts_each_storage_once_by_module_and_leaves_outputs_alone():
    class Twice(torch.nn.Module):  # saves its input for the square and the same storage again for the mul
        def forward(self, x):
            return x.square() * x

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Twice())
    x = torch.randn(4, 8)
    total, by_module = bench_models.saved_activations_mib(model, lambda: model(x))
    one = 4 * 8 * 4 / bench_models.MIB  # a (4, 8) float32 tensor
    # Linear keeps its input x (the weight is a parameter, not counted); Twice keeps its input (the Linear's
    # output) once though two ops save it, and the square's output for the mul.
    assert by_module == pytest.approx({"Linear": one, "Twice": 2 * one})
    assert total == pytest.approx(3 * one)
    assert torch.equal(model(x), model[1](model[0](x)))  # the hooks are gone and never changed an output


def test_saved_activations_by_module_sees_the_model_as_training_runs_it():
    """The module labels must not change what is saved: hooks on a layer would make the feed-forward
    fall back to plain autograd (a layer with hooks is not bare), which keeps one more activation."""
    from test_transformer import make_inputs, make_model

    model = make_model().train()
    inputs = make_inputs()

    def forward():
        return model(*inputs[:3], condition=inputs[3]).sample

    total, by_module = bench_models.saved_activations_mib(model, forward)
    unlabelled = _measure.saved_activation_bytes(forward, exclude=list(model.parameters()))
    assert total == pytest.approx(sum(unlabelled.values()) / MIB)
    assert sum(by_module.values()) == pytest.approx(total)


def test_saved_activations_cli_prints_both_transformers(capsys):
    bench_models.main(["--saved_activations", f"dit:tiny:{TINY_VIDEO}", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "## ours:" in out and "## wan:" in out and "- NanoI2VFeedForward:" in out
    with pytest.raises(ValueError, match="dit:SIZE:FxHxW"):
        bench_models.main(["--saved_activations", f"vae:tiny:{TINY_VIDEO}", "--device", "cpu"])


# --------------------------------------------------------------------------------------------------
# bench_vae_memory (the one test with a worker subprocess)
# --------------------------------------------------------------------------------------------------


def test_bench_vae_memory_worker_round_trip(tmp_path, capsys):
    out = tmp_path / "vae_memory.json"
    frames, resolution = 5, 32
    rows = bench_vae_memory.main([
        "--frames", str(frames), "--modes", "chunked", "--preset", "tiny", "--resolution", str(resolution),
        "--device", "cpu", "--json", str(out),
    ])  # fmt: skip
    assert len(rows) == 1 and rows[0]["frames"] == frames and rows[0]["tiling"] == "off"
    assert rows[0]["output_mib"] == pytest.approx(3 * frames * resolution * resolution * 4 / MIB)
    assert math.isfinite(rows[0]["peak_growth_mib"])
    assert json.loads(out.read_text()) == rows
    assert len(_table_lines(capsys.readouterr().out, "frames")) == 3


# --------------------------------------------------------------------------------------------------
# bench_pipeline
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory):
    return save_tiny_random_text_encoder(tmp_path_factory.mktemp("tiny_bert"), hidden_size=32)


def test_bench_pipeline_smoke_counts_transformer_calls(tmp_path, tiny_text_encoder, capsys):
    steps = 2
    results = bench_pipeline.main([
        "--videos", TINY_VIDEO, "--steps", str(steps), "--transformer", "tiny", "--vae_preset", "tiny",
        "--text_encoder", str(tiny_text_encoder), "--repeats", "1", "--warmup", "0", "--no_vae_memory",
        "--first_block_cache", "0.1", "--device", "cpu", "--out", str(tmp_path / "pipeline.json"),
    ])  # fmt: skip
    rows = {row["variant"]: row for row in results["pipeline"]}
    assert set(rows) == {"euler, CFG batched", "euler, CFG 2 calls", "euler, no CFG", "heun, CFG batched",
                         "euler, CFG batched + negative guidance", "euler, CFG batched, first block cache 0.1",
                         "euler, CFG batched, pyramid attention broadcast", "euler, CFG batched, faster cache"}
    assert (rows["euler, CFG batched"]["calls"], rows["euler, CFG batched"]["forwards"]) == (steps, steps)
    assert (rows["euler, CFG 2 calls"]["calls"], rows["euler, CFG 2 calls"]["forwards"]) == (steps, 2 * steps)
    assert rows["euler, no CFG"]["forwards"] == steps
    assert rows["heun, CFG batched"]["calls"] == 2 * steps - 1  # Heun: two evaluations per step but the last
    assert rows["euler, CFG batched"]["relative"] == 1.0
    for name in ("euler, CFG batched + negative guidance", "euler, CFG batched, first block cache 0.1",
                 "euler, CFG batched, pyramid attention broadcast", "euler, CFG batched, faster cache"):
        assert rows[name]["calls"] == rows[name]["forwards"] == steps  # the extra branch rides in the same call
    assert all(row["tokens"] == 8 for row in rows.values())
    output = capsys.readouterr().out
    assert len(_table_lines(output, "video FxHxW")) == 2 + len(rows)
    assert "offload" in output  # says why offloading was not measured
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert {row["table"] for row in saved["rows"]} == {"pipeline"}


def test_bench_pipeline_times_a_saved_pipeline(tmp_path, tiny_text_encoder):
    args = bench_pipeline.parse_args(["--transformer", "tiny", "--vae_preset", "tiny", "--device", "cpu"])
    bench_pipeline.build_pipeline(args, "euler", *load_text_encoder(str(tiny_text_encoder))).save_pretrained(
        tmp_path / "saved"
    )
    results = bench_pipeline.main([
        "--model", str(tmp_path / "saved"), "--videos", TINY_VIDEO, "--steps", "2", "--text_encoder",
        str(tiny_text_encoder), "--repeats", "1", "--warmup", "0", "--no_vae_memory", "--device", "cpu",
    ])  # fmt: skip
    rows = {row["variant"]: row for row in results["pipeline"]}
    assert rows["heun, CFG batched"]["calls"] == 3 and rows["euler, CFG batched"]["calls"] == 2  # solver swapped in


def test_split_batch_timer_matches_the_batched_forward():
    """The "CFG 2 calls" variant must compute the same velocity as one batched call."""
    transformer = bench_models.build_transformer("ours", "tiny").eval()
    with torch.no_grad():
        for p in transformer.parameters():  # adaLN-Zero starts at a zero output: make it input-dependent
            p.add_(torch.randn_like(p) * 0.05)
    inputs = bench_models.dit_inputs((5, 32, 32), batch_size=2, device=torch.device("cpu"))
    kwargs = dict(hidden_states=inputs["latents"], timestep=inputs["timestep"],
                  encoder_hidden_states=inputs["text"], condition=inputs["condition"], return_dict=False)  # fmt: skip
    with torch.no_grad():
        expected = transformer(**kwargs)[0]
        timer = bench_pipeline.TransformerTimer(transformer, torch.device("cpu"), split_batch=True)
        split = transformer(**kwargs)[0]
    assert timer.forwards == 2 and len(timer.seconds) == 1
    assert expected.abs().max() > 0
    torch.testing.assert_close(split, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# bench_train_gpu
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_bench_train_gpu_runs_on_cpu(tmp_path, capsys, precision):
    out = tmp_path / "train.json"
    result = bench_train_gpu.main([
        "--device", "cpu", "--preset", "tiny", "--video", TINY_VIDEO, "--batch_size", "2", "--steps", "1",
        "--warmup", "0", "--precision", precision, "--out", str(out),
    ])  # fmt: skip
    assert result["tokens"] == 8 and result["compile"] == "no"  # compile is "auto": CUDA only
    assert result["mfu"] is None  # no meaningful peak on CPU
    assert result["tokens_per_second"] == pytest.approx(result["steps_per_second"] * 2 * 8)
    assert math.isfinite(result["final_loss"])
    assert json.loads(out.read_text())["rows"][0]["preset"] == "tiny"
    assert len(_table_lines(capsys.readouterr().out, "device")) == 3


def test_bench_train_gpu_profiles_the_step_and_switches_to_plain_autograd(tmp_path, monkeypatch):
    from nanoi2v_diffusers.models import transformer_nanoi2v

    monkeypatch.setattr(transformer_nanoi2v, "SAVE_ACTIVATION_MEMORY", True)  # restored after the run flips it
    result = bench_train_gpu.main([
        "--device", "cpu", "--preset", "tiny", "--video", TINY_VIDEO, "--batch_size", "2", "--steps", "1",
        "--warmup", "0", "--plain_autograd", "--profile", str(tmp_path / "profile.txt"),
    ])  # fmt: skip
    assert result["autograd"] == "plain" and not transformer_nanoi2v.SAVE_ACTIVATION_MEMORY
    table = (tmp_path / "profile.txt").read_text()
    assert "Self CPU" in table and "aten::" in table  # the operators of the profiled steps, by time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_bench_cpu_malloc_times_both_settings_in_workers(tmp_path, capsys):
    out = tmp_path / "malloc.json"
    rows = bench_cpu_malloc.main([
        "--models", "dit", "--video", TINY_VIDEO, "--dit_batch_size", "2",
        "--rounds", "1", "--steps", "1", "--warmup", "0", "--out", str(out),
    ])  # fmt: skip
    (row,) = rows
    assert row["model"] == "dit" and row["batch_size"] == 2
    assert row["default_ms"] > 0 and row["kept_ms"] > 0 and row["default_peak_mib"] > 0
    assert row["speedup"] == pytest.approx(row["default_ms"] / row["kept_ms"])  # one round: its own ratio
    assert json.loads(out.read_text())["rows"] == rows
    assert len(_table_lines(capsys.readouterr().out, "model")) == 3


def test_bench_cpu_malloc_vae_step_trains_the_decoder_only():
    step = bench_cpu_malloc.VAEDecoderStep(batch_size=1, video=(5, 32, 32))
    encoder_before = [p.detach().clone() for p in step.vae.encoder.parameters()]
    decoder_before = [p.detach().clone() for p in step.vae.decoder.parameters()]
    step()
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, step.vae.encoder.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(decoder_before, step.vae.decoder.parameters()))


def test_model_flops_split_video_and_text_parameters():
    model = bench_models.build_transformer("ours", "tiny")
    grid, batch, text_tokens = (2, 2, 2), 3, 5
    flops = bench_train_gpu.model_flops_per_step(model, batch, grid, text_tokens)
    assert bench_train_gpu.model_flops_per_step(model, 2 * batch, grid, text_tokens) == pytest.approx(2 * flops)
    # Every parameter is counted once: on the video tokens or, for the text-side modules, on the text tokens.
    all_params = sum(p.numel() for p in model.parameters())
    text_params = sum(p.numel() for m in bench_train_gpu._text_side_modules(model) for p in m.parameters())
    assert 0 < text_params < all_params
    with_more_text = bench_train_gpu.model_flops_per_step(model, batch, grid, text_tokens + 1)
    attention_per_text_token = 12 * model.config.num_layers * 128 * batch * 8  # width 4 x 32, 8 video tokens
    assert with_more_text - flops == pytest.approx(6 * batch * text_params + attention_per_text_token)


# --------------------------------------------------------------------------------------------------
# keyframe_placement
# --------------------------------------------------------------------------------------------------


def test_keyframe_placement_prints_each_candidate_below_the_clips_own_latent(capsys):
    keyframe_placement.main(["--num_clips", "2", "--threads", "1", "--vae",
                             str(BENCHMARKS.parent / "examples" / "nanoi2v-shapes-64" / "vae")])  # fmt: skip
    table = _table_lines(capsys.readouterr().out, "candidate")
    rows = {line.split(" | ")[0].strip("| "): [float(cell) for cell in line.strip("| ").split(" | ")[1:]]
            for line in table[2:]}  # fmt: skip
    assert len(rows) == 5 and all(len(values) == 4 for values in rows.values())  # frames 4, 8, 12, 16
    ceiling = rows.pop("the clip's own latent (ceiling)")
    assert all(c > value + 5 for values in rows.values() for c, value in zip(ceiling, values))
