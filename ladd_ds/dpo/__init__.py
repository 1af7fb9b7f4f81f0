"""Diffusion-DPO post-training (DESIGN.md section 1, "DPO stage"): loss, LoRA adapters, the DPO
step on DeepSpeed engines, and preference-pair data."""
