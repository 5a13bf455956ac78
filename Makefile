# Two commands for a fresh machine (each sets up .venv first):
#   make demo   phantoms -> train both stages -> predict held-out phantoms -> evaluate
#   make test   the lint check and the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/demo
DEMO_DATA := data/phantoms data/phantoms_test

.PHONY: demo test lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) phantoms.py --out_dir data/phantoms --num_cases 80 --shape 48 128 128 --shape 48 112 112 --seed 0 --overwrite
	$(PY) phantoms.py --out_dir data/phantoms_test --num_cases 6 --shape 48 128 128 --shape 48 112 112 --seed 1000 --overwrite
	$(PY) train.py --data_dir data/phantoms --output_dir $(RUN) --overwrite --device cpu \
		--base_channels 4 --padding 12 16 16 --locator_max_epochs 6 --max_epochs 7
	$(PY) predict.py --data_dir data/phantoms_test --output_dir $(RUN)/predictions --overwrite --device cpu \
		--locator_path $(RUN)/locator/best.pt --segmenter_path $(RUN)/segmenter/best.pt --tta --largest_component
	$(PY) evaluate.py --pred_dir $(RUN)/predictions --data_dir data/phantoms_test

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# What `make demo` and the set-up wrote, nothing else (your own data under data/ stays).
clean:
	rm -rf $(VENV) $(DEMO_DATA) $(RUN)
