"""Latent and preference-pair datasets: MDS shard schema, atomic writer, streaming loader with
exact resume."""

from ladd_ds.data.loader import (
    LatentDataset,
    build_loader,
    clean_stale_shared_memory_once,
    collate,
    iterate_forever,
)
from ladd_ds.data.schema import LATENTS, OPTIONAL_COLUMNS, PAIRS, REQUIRED_COLUMNS, Layout, validate_mds_dir
from ladd_ds.data.writer import write_random_latents, write_samples

__all__ = [
    "LatentDataset",
    "build_loader",
    "clean_stale_shared_memory_once",
    "collate",
    "iterate_forever",
    "LATENTS",
    "Layout",
    "OPTIONAL_COLUMNS",
    "PAIRS",
    "REQUIRED_COLUMNS",
    "validate_mds_dir",
    "write_random_latents",
    "write_samples",
]
