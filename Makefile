# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# torch is pinned to 2.13.0 in pyproject.toml, so pip keeps the torch 2.13.0 build already
# installed (CPU or CUDA) instead of fetching another for accelerate (docs/getting-started.md).
PY := .venv/bin/python

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test test-slow chromium protected-model filtered-model
demo: .venv/installed
	HF_HUB_OFFLINE=1 .venv/bin/patronus demo

# The report test renders report.html in headless Chromium (Debian's package); without it,
# that one test is skipped with a message saying so.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
		echo "note: could not install Chromium; the report rendering test will be skipped"

test: .venv/installed chromium
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist worksteal --durations=20

test-slow: .venv/installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# Rebuild the shipped patronus-tiny-protected (v5) from scratch: the full preset, both parts
# (116 min on a 2-core CPU: the UNet 62 min, the decoder 54; an H200 is only 3-12x faster on this
# tiny model, docs/results/performance.md), then its vae/, unet/ and patronus.json go into
# patronus/assets/ (docs/how-to/protect.md, "Rebuild the shipped model").
protected-model: .venv/installed
	rm -rf runs/protected-full runs/protected-full.work patronus/assets/patronus-tiny-protected
	HF_HUB_OFFLINE=1 .venv/bin/patronus protect patronus-tiny --preset full --out runs/protected-full
	$(PY) -m patronus.models.ship runs/protected-full patronus-tiny-protected

# Rebuild the data-filtered reference patronus-tiny-filtered: patronus-tiny's recipe on benign and
# hard-negative glyphs only (reproduce/train-filtered.toml; resumable: rerun to continue), then
# its pipeline goes into patronus/assets/.
filtered-model: .venv/installed
	HF_HUB_OFFLINE=1 .venv/bin/patronus train-base --config reproduce/train-filtered.toml --workdir runs/filtered
	rm -rf patronus/assets/patronus-tiny-filtered
	cp -r runs/filtered/pipeline patronus/assets/patronus-tiny-filtered
