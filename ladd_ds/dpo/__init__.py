"""Diffusion-DPO post-training (docs/method.md, section 5): loss, LoRA adapters, the DPO
step on DeepSpeed engines, and preference-pair data."""
