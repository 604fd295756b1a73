# The two commands of the README. Both set everything up on a fresh machine first.
.PHONY: setup run test

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# The main job on the embedded tiny default: synthesize images with Ray Data, under ./outputs/RUN_ID/.
run: setup
	.venv/bin/python pipelines/synthesize.py

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m pytest
