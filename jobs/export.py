"""Entry point for `ray job submit`: same options as `breakhis export`.

ray job submit --working-dir . -- python jobs/export.py --help
"""

import sys
from pathlib import Path

# With --working-dir the package is uploaded beside this folder, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
