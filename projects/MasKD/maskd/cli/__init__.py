"""The command lines of MasKD, importable: ``train_net.py``, ``distill_net.py`` and
``tools/export.py`` in the repository are thin scripts over these modules, which also run as
``python -m maskd.cli.train`` (``distill``, ``export``) where the package is installed."""
