"""`python -m attnseg.pipeline.cli`: the `attnseg` command (torchrun, Slurm and Ray run it so)."""

import sys

from . import main

sys.exit(main())
