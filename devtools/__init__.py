"""Development-only helpers (test host, training, benchmarks). Not loaded by ComfyUI."""
