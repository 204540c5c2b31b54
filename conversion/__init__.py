"""Conversion of the authors' LLaVA-UHD checkpoints to the Hub-native format, and publishing to the Hub."""
