# The two commands of the README. Both set everything up on a fresh machine first.
.PHONY: setup run test

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# The main job on the embedded tiny default: synthesize images, then caption them, under ./outputs/demo.
run: setup
	.venv/bin/python -m janus_batch.demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m pytest
