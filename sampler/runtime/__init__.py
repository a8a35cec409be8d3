"""The model runtime: loading weights, CPU kernels, tiny test models and KV-cache helpers.

Sampling strategies (sampler/*.py) call into this room; it never imports a strategy.
"""
