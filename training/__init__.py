"""Training recipes for LLaVA-UHD on TRL's `SFTTrainer` (`python -m training.sft --config ...`). Used from a checkout
(not installed)."""
