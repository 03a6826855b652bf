"""The shared core every stage uses: typed config and its validation, the process group and accelerator,
precision, run-dir records, atomic writes, logging, provenance, step metrics."""
