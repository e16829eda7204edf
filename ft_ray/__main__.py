"""`python -m ft_ray` runs the `ft-ray` command line."""

from ft_ray.cli import main_exit

main_exit()
