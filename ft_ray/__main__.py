"""`python -m ft_ray` runs the `ft-ray` command line."""

import sys

from ft_ray.cli import main

sys.exit(main())
