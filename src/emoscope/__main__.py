"""`python -m emoscope ...`: the command line, also as launchers start it
(`torchrun --nproc_per_node 2 -m emoscope run --config quick`)."""

from .cli import main

main()
