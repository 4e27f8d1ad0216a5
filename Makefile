# Two commands for a newcomer: `make test` and `make demo`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch is installed first: a bare `torch` requirement in a fresh venv pulls
# several GB of CUDA packages (see README "Install").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test demo train-demo app docs docs-figures clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,demo,docs,app]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) examples/demo.py

# The built-in model's recipe (training/configs/shapes_64_recipe.yaml: VAE, latent cache, DiT), its score against
# the shipped model, then the demo with it. Stopped, it continues where it stopped when run again.
train-demo: $(STAMP)
	$(PY) examples/demo.py --train

# The web app (examples/app.py, Gradio) with the built-in model: open http://127.0.0.1:7860
app: $(STAMP)
	$(PY) examples/app.py

# The docs site (mkdocs.yml: lessons, design, results, API) into site/; `$(VENV)/bin/mkdocs serve` to browse it
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# The lessons' pictures from inside the shipped model (docs/figures/*.png)
docs-figures: $(STAMP)
	$(PY) examples/interpret.py --out docs/figures

clean:
	rm -rf $(VENV) outputs site .pytest_cache
