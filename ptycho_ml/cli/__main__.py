"""``python -m ptycho_ml.cli``: the ``ptycho-ml`` command (how the MLproject entry points call it)."""

from ptycho_ml.cli import main

main()
