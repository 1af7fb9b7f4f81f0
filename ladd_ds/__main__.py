import sys

from ladd_ds.cli import main

sys.exit(main())
