"""Training recipes, one readable module each: `sft` (loss on the response tokens) and `dpo` (preference
pairs against the base model). They share the optimizer, precision and clipping (`core/training.py`)."""
