#!/usr/bin/env python
"""MasKD end to end in one command: learn the tokens, distil the student, export, evaluate; see
``maskd/cli/distill.py`` (``python distill_net.py --help``)."""

from maskd.cli.distill import main

if __name__ == "__main__":
    main()
