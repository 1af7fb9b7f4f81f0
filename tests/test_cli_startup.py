"""`ladd-ds --help` (and any argument error) answers without importing torch: the CLI imports a
command's modules only when that command runs (ladd_ds/cli.py). Measured on 2 busy CPU cores:
`python -m ladd_ds --help` 0.13-0.47 s (best of 5), importing torch alone 2-9 s."""

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "deepspeed", "diffusers", "transformers", "streaming", "peft", "safetensors", "numpy", "PIL")

PROBE = """
import json, sys
from ladd_ds import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_help_builds_the_parser_without_heavy_modules():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert "argparse" in loaded and "ladd_ds" in loaded  # the probe ran the CLI's parser
    assert not set(HEAVY) & set(loaded), f"`ladd-ds --help` imports {sorted(set(HEAVY) & set(loaded))}"
