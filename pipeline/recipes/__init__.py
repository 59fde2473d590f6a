"""Training recipes, one readable module each: `sft` (loss on the response tokens: setup, resume, step,
logging, checkpoints) and `dpo` (preference pairs against the base model, after the SFT steps)."""
