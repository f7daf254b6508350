"""Shared training core: config, distributed set-up, the curriculum-driven loop, checkpoints."""
