# Two commands for a fresh machine (each sets up .venv first):
#   make demo   phantoms -> train both stages -> predict held-out phantoms -> evaluate
#   make test   the lint check and the test suite (what CI runs)
#   make demo-tumour   brain-tumour phantoms (4 channels, 3 classes) -> patch strategy -> per-class metrics
#   make demo-cine     cine phantoms (ACDC layout) -> 2D V-Net on slices -> masks -> Dice and cardiac function
#   make demo-spine    CT spine phantoms -> iterative FCN -> one vertebra at a time -> instance metrics
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/demo
DEMO_DATA := data/phantoms data/phantoms_test
TUMOUR_RUN := runs/demo_tumour
TUMOUR_DATA := data/brain_tumour data/brain_tumour_test
CINE_RUN := runs/demo_cine
CINE_DATA := data/cine data/cine_test
SPINE_RUN := runs/demo_spine
SPINE_DATA := data/spine data/spine_test
REGIONS := whole_tumour=1,2,3 tumour_core=2,3 enhancing=3

.PHONY: demo demo-tumour demo-cine demo-spine test lint setup clean

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

demo-tumour: setup
	$(PY) phantoms.py --kind brain_tumour --out_dir data/brain_tumour --num_cases 40 --seed 0 --overwrite
	$(PY) phantoms.py --kind brain_tumour --out_dir data/brain_tumour_test --num_cases 10 --seed 1000 --overwrite
	$(PY) train.py --data_dir data/brain_tumour --output_dir $(TUMOUR_RUN) --overwrite --device cpu --strategy patches \
		--patch_size 32 64 64 --base_channels 4 --max_epochs 20 --samples_per_epoch 48
	$(PY) predict.py --data_dir data/brain_tumour_test --output_dir $(TUMOUR_RUN)/predictions --overwrite --device cpu \
		--segmenter_path $(TUMOUR_RUN)/segmenter/best.pt
	$(PY) evaluate.py --pred_dir $(TUMOUR_RUN)/predictions --data_dir data/brain_tumour_test --regions $(REGIONS)

demo-cine: setup
	$(PY) phantoms.py --kind cine --out_dir data/cine --num_cases 40 --seed 0 --overwrite
	$(PY) phantoms.py --kind cine --out_dir data/cine_test --num_cases 10 --seed 1000 --first_id 901 --overwrite
	$(PY) train.py --data_dir data/cine --output_dir $(CINE_RUN) --overwrite --device cpu --spatial_dims 2 \
		--strategy patches --patch_size 128 128 --base_channels 4 --max_epochs 20 --samples_per_epoch 128
	$(PY) predict.py --data_dir data/cine_test --output_dir $(CINE_RUN)/predictions --overwrite --device cpu \
		--segmenter_path $(CINE_RUN)/segmenter/best.pt --output_format nii.gz
	$(PY) evaluate.py --cardiac --pred_dir $(CINE_RUN)/predictions --data_dir data/cine_test --overwrite

demo-spine: setup
	$(PY) phantoms.py --kind spine --out_dir data/spine --num_cases 30 --seed 0 --overwrite
	$(PY) phantoms.py --kind spine --out_dir data/spine_test --num_cases 10 --seed 1000 --overwrite
	$(PY) train.py --data_dir data/spine --output_dir $(SPINE_RUN) --overwrite --device cpu --strategy iterative \
		--patch_size 48 64 64 --base_channels 4 --max_epochs 30 --samples_per_epoch 64
	$(PY) predict.py --data_dir data/spine_test --output_dir $(SPINE_RUN)/predictions --overwrite --device cpu \
		--segmenter_path $(SPINE_RUN)/segmenter/best.pt
	$(PY) evaluate.py --instances --pred_dir $(SPINE_RUN)/predictions --data_dir data/spine_test

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# What `make demo` and the set-up wrote, nothing else (your own data under data/ stays).
clean:
	rm -rf $(VENV) $(DEMO_DATA) $(RUN) $(TUMOUR_DATA) $(TUMOUR_RUN) $(CINE_DATA) $(CINE_RUN) $(SPINE_DATA) $(SPINE_RUN)
