"""``python -m projkernels.demo``: see ``python -m projkernels.demo --help``."""
from .cli import main

if __name__ == "__main__":
    main()
