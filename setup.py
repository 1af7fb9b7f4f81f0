"""ladd_ds: Latent Adversarial Diffusion Distillation with DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="ladd_ds",
    version="0.1.0",
    description="Latent Adversarial Diffusion Distillation (LADD) trainer on DeepSpeed",
    python_requires=">=3.11",
    packages=find_packages(include=["ladd_ds", "ladd_ds.*", "evaluation", "evaluation.*"]),
    # ds_configs/ and configs/ are read from the source tree (editable install, see README).
    install_requires=[
        # mosaicml-streaming imports torchvision: it must match torch (pinned in constraints).
        "torch>=2.9",
        "torchvision",
        "deepspeed>=0.19.3",  # non-reentrant checkpointing of frozen params under ZeRO-3
        "diffusers>=0.39,<0.40",
        # <5: mosaicml-streaming 0.13 pins it; >=4.56: from_pretrained(dtype=...), which
        # replaced the deprecated torch_dtype argument.
        "transformers>=4.56,<5",
        "mosaicml-streaming>=0.13",
        "numpy<2.2",
        "tensorboard",
        "pyyaml",
        "safetensors",
        "tqdm",
        "ninja",  # DeepSpeed JIT-compiles its CPU comm op
        "peft",
        "torchmetrics",
        # FID's Inception-v3 for `ladd-ds evaluate` (torchmetrics runs it); 0.4.0 installs a top-level
        # `tests` package that hides this repository's tests/ from `import tests.conftest`.
        "torch-fidelity>=0.3,<0.4",
        "scikit-learn",  # the demo's data: its bundled 8x8 digits
        "pillow",
        "matplotlib",  # the demo report's FD-vs-steps plot
    ],
    extras_require={"dev": ["pytest"]},
    entry_points={"console_scripts": ["ladd-ds=ladd_ds.cli:main"]},
)
