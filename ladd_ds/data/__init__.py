"""Latent datasets: MDS shard schema, atomic writer, streaming loader with exact resume."""

from ladd_ds.data.loader import (
    LatentDataset,
    build_loader,
    clean_stale_shared_memory_once,
    collate,
    iterate_forever,
)
from ladd_ds.data.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, validate_mds_dir
from ladd_ds.data.writer import write_random_latents, write_samples

__all__ = [
    "LatentDataset",
    "build_loader",
    "clean_stale_shared_memory_once",
    "collate",
    "iterate_forever",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "validate_mds_dir",
    "write_random_latents",
    "write_samples",
]
