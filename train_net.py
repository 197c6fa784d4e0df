#!/usr/bin/env python
"""Train and evaluate MasKD models (and plain students) with detectron2: see
``maskd/cli/train.py`` (``python train_net.py --help``)."""

from maskd.cli.train import cli

if __name__ == "__main__":
    cli()
