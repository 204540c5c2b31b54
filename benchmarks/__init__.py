"""Benchmarks of LLaVA-UHD against anchors measured in the same process (see README, "Performance")."""
