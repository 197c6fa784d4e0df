#!/usr/bin/env python
"""Export MasKD checkpoints model-zoo style: see ``maskd/cli/export.py``
(``python tools/export.py --help``)."""

from maskd.cli.export import main

if __name__ == "__main__":
    main()
