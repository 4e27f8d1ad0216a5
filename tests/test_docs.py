"""The documentation site: it builds with `mkdocs build --strict`, every Python snippet of the lessons runs
against the code as it is, and examples/interpret.py makes the lessons' figures."""

import importlib.util
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LESSONS = sorted((REPO / "docs" / "lessons").glob("*.md"))
INTERPRET = REPO / "examples" / "interpret.py"
FIGURES = ("denoising_strip.png", "cross_attention.png", "rope_similarity.png", "vae_latents.png",
           "guidance_scales.png")  # fmt: skip
MAX_FIGURE_BYTES = 300 * 1024
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", flags=re.S | re.M)


def python_blocks(path: Path):
    """The ```python blocks of a markdown file, in order, with the line each starts on."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


# ----------------------------------------------------------------------------------------------- the site


def test_mkdocs_build_strict_passes(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install mkdocs mkdocs-material 'mkdocstrings[python]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output[-4000:]}"
    assert "WARNING" not in output, output[-4000:]
    for page in ("index.html", "api/index.html", *(f"lessons/{lesson.stem}/index.html" for lesson in LESSONS)):
        assert (site / page).is_file(), f"{page} was not built"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("NanoI2VPipeline", "NanoI2VTransformer3DModel", "AutoencoderKLNanoI2V", "NanoI2VFlowMatchScheduler",
                 "build_image_condition", "evaluate_pipeline"):  # fmt: skip
        assert name in api, f"the API page does not document {name}"
    for figure in FIGURES:  # every figure is shown by a lesson, and copied into the site
        assert (site / "figures" / figure).is_file(), figure
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")  # renders offline


def test_every_figure_is_used_by_a_lesson_and_every_image_exists():
    used = set()
    for lesson in LESSONS:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", lesson.read_text(encoding="utf-8")):
            path = (lesson.parent / target).resolve()
            assert path.is_file(), f"{lesson.name} shows {target}, which does not exist"
            used.add(path.name)
    assert set(FIGURES) <= used, f"figures no lesson shows: {sorted(set(FIGURES) - used)}"
    for figure in FIGURES:
        assert (REPO / "docs" / "figures" / figure).stat().st_size < MAX_FIGURE_BYTES, figure


# ----------------------------------------------------------------------------------------------- the lessons


def test_there_are_six_lessons_each_with_one_to_three_snippets():
    assert len(LESSONS) == 6, [lesson.name for lesson in LESSONS]
    for lesson in LESSONS:
        assert 1 <= len(python_blocks(lesson)) <= 3, f"{lesson.name}: {len(python_blocks(lesson))} python blocks"


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.stem for lesson in LESSONS])
def test_lesson_snippets_run(lesson, monkeypatch, capsys):
    """The lesson's ```python blocks, in order, in one fresh namespace, from the repository root (as a reader
    pastes them into a Python session there)."""
    monkeypatch.chdir(REPO)
    namespace = {"__name__": f"lesson_{lesson.stem.replace('-', '_')}"}
    for line, block in python_blocks(lesson):
        try:
            exec(compile(block, f"{lesson.relative_to(REPO)}:{line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the python block at {lesson.relative_to(REPO)}:{line} failed:\n{traceback.format_exc()}")
    assert capsys.readouterr().out.strip(), f"{lesson.name}: the snippets print nothing"


# ----------------------------------------------------------------------------------------------- interpret.py


def _interpret_module():
    spec = importlib.util.spec_from_file_location("interpret", INTERPRET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, flag",
    [(["--steps", "0"], "--steps"), (["--steps", "many"], "--steps"), (["--seed", "-1"], "--seed"),
     (["--model", "no/such/folder"], "--model"), (["--out", str(INTERPRET)], "--out")],  # fmt: skip
)
def test_interpret_refuses_bad_values_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        _interpret_module().parse_args(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("interpret.py: error:") and flag in error, error


@pytest.mark.slow
def test_interpret_writes_the_five_figures(tmp_path):
    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, str(INTERPRET), "--steps", "2", "--seed", "0", "--out", str(out)],
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(path.name for path in out.iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        path = out / name
        assert 1024 < path.stat().st_size < MAX_FIGURE_BYTES, (name, path.stat().st_size)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 60, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 8, f"{name} is nearly blank"
