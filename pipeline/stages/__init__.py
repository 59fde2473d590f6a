"""The DVC stages, one module each: `python -m pipeline.stages.<name>`; a stage imports only pipeline.core."""
