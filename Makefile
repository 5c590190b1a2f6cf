# Two commands for a new user: `make run` and `make test` (see README.md).
PY := .venv/bin/python
NB := M63556AB_RepLearning.ipynb

.PHONY: run test lab setup data check-run html pdf

# No timings, and printed lines merged however the kernel flushed them: re-running leaves the
# committed notebook unchanged where the results are.
EXECUTE := .venv/bin/jupyter nbconvert --to notebook --execute --inplace \
  --ExecutePreprocessor.timeout=-1 --ExecutePreprocessor.record_timing=False \
  --NotebookExporter.preprocessors=nbconvert.preprocessors.CoalesceStreamsPreprocessor

# With VAE_RESULTS_DIR set, the notebook is drawn from that folder into it: a copy is executed
# there (and writes its generated_sample.png there); the committed notebook is left as it is.
run: setup
ifdef VAE_RESULTS_DIR
	@test -d "$(VAE_RESULTS_DIR)" || { echo "VAE_RESULTS_DIR=$(VAE_RESULTS_DIR) is not a folder"; exit 2; }
	cp $(NB) "$(VAE_RESULTS_DIR)/$(NB)"
	$(EXECUTE) "$(VAE_RESULTS_DIR)/$(NB)"
	@echo "drawn from $(VAE_RESULTS_DIR): $(VAE_RESULTS_DIR)/$(NB)"
else
	$(EXECUTE) $(NB)
endif

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

.venv/.installed: requirements.txt pyproject.toml
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "Python 3.10 or newer is needed; python3 is $$(python3 --version)"; exit 1; }
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Offline the data come from Debian's package (needs root); otherwise torchvision downloads them.
data: .venv/.installed
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "apt-get could not install dataset-fashion-mnist; torchvision will try to download"; \
	fi
	$(PY) -c "import vae_helpers as v; tr, te = v.load_data(); print('Fashion-MNIST:', tuple(tr.shape), tuple(te.shape))"

# The notebook as HTML with its math typeset offline (Debian's MathJax), and that page printed to
# A4 PDF by headless Chromium. Both are git-ignored. As root on Debian, make installs the two.
MATHJAX := /usr/share/javascript/mathjax/MathJax.js
html: setup
	@[ -f $(MATHJAX) ] || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq libjs-mathjax; } \
	  || { echo "no offline MathJax: apt-get install libjs-mathjax"; exit 1; }
	.venv/bin/jupyter nbconvert --to html $(NB) --template html_template \
	  --TemplateExporter.extra_template_basedirs=. \
	  --HTMLExporter.mathjax_url="file://$(MATHJAX)?config=TeX-AMS_CHTML"
	@echo "written: $(NB:.ipynb=.html)"

pdf: html
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq chromium; } \
	  || { echo "no chromium: apt-get install chromium"; exit 1; }
	chromium --headless --no-sandbox --disable-gpu --no-pdf-header-footer \
	  --virtual-time-budget=30000 --print-to-pdf="$(CURDIR)/$(NB:.ipynb=.pdf)" \
	  "file://$(CURDIR)/$(NB:.ipynb=.html)"
	@echo "written: $(NB:.ipynb=.pdf)"
