"""The DVC stages, one thin module each: `python -m pipeline.stages.<name>`.

A stage imports the library, the registries and the recipes, never another stage."""
