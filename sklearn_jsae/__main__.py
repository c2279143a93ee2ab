"""``python -m sklearn_jsae``: train a JSAE and a traditional SAE pair on the bundled real MLP and
compare them (see :mod:`sklearn_jsae._main_job`; ``python -m sklearn_jsae --help``).

``python -m sklearn_jsae evaluate [...]`` runs the paper-style evaluation instead
(see ``python -m sklearn_jsae evaluate --help``), and ``python -m sklearn_jsae train [...]`` a long,
resumable run streamed from a model (see ``python -m sklearn_jsae train --help``).
"""

from __future__ import annotations

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "evaluate":
        from ._evaluate import main as evaluate

        return evaluate(argv[1:])
    if argv and argv[0] == "train":
        from ._cli_train import main as train

        return train(argv[1:])
    from ._main_job import main as main_job

    return main_job(argv)


if __name__ == "__main__":
    sys.exit(main())
