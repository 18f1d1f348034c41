"""``python -m projkernels.bench_smoke``: see ``python -m projkernels.bench_smoke --help``."""
from .cli import main

if __name__ == "__main__":
    main()
