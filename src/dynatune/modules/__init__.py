"""Trainable modules dynatune injects itself (IST's series and parallel bottleneck adapters)."""
