# Two commands for a new user: `make run` and `make test` (see README.md).
PY := .venv/bin/python
NB := M63556AB_RepLearning.ipynb

.PHONY: run test lab setup data check-run

# No timings, and printed lines merged however the kernel flushed them: re-running leaves the
# committed notebook unchanged where the results are.
run: setup
	.venv/bin/jupyter nbconvert --to notebook --execute --inplace \
	  --ExecutePreprocessor.timeout=-1 --ExecutePreprocessor.record_timing=False \
	  --NotebookExporter.preprocessors=nbconvert.preprocessors.CoalesceStreamsPreprocessor $(NB)

# CI's first step: the committed notebook and generated_sample.png are exactly what the code draws
# from results/ (figures byte for byte), so executing it leaves the checkout unchanged.
check-run: run
	@changed="$$(git status --porcelain)"; if [ -n "$$changed" ]; then \
	  echo "make run changed the checkout:"; echo "$$changed"; git diff --stat; exit 1; fi
	@echo "make run left the checkout unchanged"

# Open the notebook in JupyterLab (in your browser; Ctrl-C here to stop it). As root (Docker, a
# cloud GPU machine) JupyterLab needs --allow-root; LAB_ARGS passes more, e.g. a port.
LAB_ARGS ?=
lab: setup
	.venv/bin/jupyter lab $(NB) $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

# The code's form first (ruff.toml), then the tests and the notebook's cells.
test: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	$(PY) -m pytest tests --nbval $(NB) --nbval-current-env -q

setup: .venv/.installed data

.venv/.installed: requirements.txt
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "Python 3.10 or newer is needed; python3 is $$(python3 --version)"; exit 1; }
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Offline the data come from Debian's package (needs root); otherwise torchvision downloads them.
data: .venv/.installed
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "apt-get could not install dataset-fashion-mnist; torchvision will try to download"; \
	fi
	$(PY) -c "import vae_helpers as v; tr, te = v.load_data(); print('Fashion-MNIST:', tuple(tr.shape), tuple(te.shape))"
