"""Judging generated images: feature networks from local weights (features), Fréchet distance,
KID and CLIP score over ranks (metrics), and `ladd-ds evaluate` (evaluate, report). docs/evaluation.md
describes the metrics and the command."""
