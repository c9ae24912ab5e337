# Attention Control: every target builds what it needs on a fresh machine.
# The test-host venv (torch + ComfyUI 0.3.75) is built once per machine in a cache folder keyed by
# a hash of requirements-host.txt (scripts/host.sh); `.venv` is a link to it.
SHELL := /bin/bash
PY = .venv/bin/python
PYTEST_ARGS ?=

.PHONY: venv browser validate test test-semantic demo bench shapes-model shapes-model-dit clean

venv:
	@v=$$(bash scripts/host.sh) && ln -sfn "$$v" .venv

# Debian's chromium for tests/test_browser.py (apt-get, once per machine; a no-op when /usr/bin/chromium exists)
browser:
	@bash scripts/browser.sh

# `comfy node validate` (registry checks: pyproject, no exec / eval / one-line statements) in a tools venv
validate:
	@bash scripts/validate.sh

test: venv browser validate
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-semantic: venv
	$(PY) -m pytest -q -s tests/test_semantic_shapes.py tests/test_semantic_dit.py $(PYTEST_ARGS)

demo: venv
	$(PY) -m devtools.demo $(if $(CKPT),--ckpt "$(CKPT)",) $(if $(MODELS),--models "$(MODELS)",)

bench: venv
	$(PY) -m bench.run

shapes-model: venv
	$(PY) -m shapesworld.train --out shapesworld/weights/shapes_world.safetensors --steps 2600

shapes-model-dit: venv
	$(PY) -m shapesworld.train_dit --out shapesworld/weights/shapes_world_dit.safetensors --steps 650

clean:
	rm -rf out bench/_runs .venv
