"""The data-generating commands: `ladd-ds synth` (teacher latents), `ladd-ds encode` (real
images) and `ladd-ds pairs` (DPO preference pairs), and the crash-safe dataset writer they share
(dataset.py)."""
