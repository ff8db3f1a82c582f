"""Side-by-side performance measurements: `python -m benchmarks --out FILE.json [--quick]`
(see benchmarks/__main__.py). One module per figure group; `serve_load.py` is the online load test."""
