"""Layers shared by the models: PyTorch-exact basics, depthwise conv, attention variants."""
