"""The gallery's reading order (sphinx-gallery's ``within_subsection_order``).

An example that is not listed here goes last, by file name; ``tests/test_examples.py`` checks
that every ``examples/plot_*.py`` is listed.
"""

ORDER = (
    "plot_quick_start.py",
    "plot_jsae_vs_traditional.py",
    "plot_l1_sweep.py",
    "plot_circuit.py",
    "plot_pipeline.py",
    "plot_smollm2.py",
    "plot_long_run.py",
)


class GalleryOrder:
    """Sort key: the position of an example's file name in :data:`ORDER`."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        return (ORDER.index(filename) if filename in ORDER else len(ORDER), filename)

    def __repr__(self):
        return f"<{type(self).__name__}>"
