"""`accelerate launch -m convert.uptrain CONFIG.yaml key=value ...` (or `python -m convert.uptrain ...`)."""

import sys

from convert.uptrain.loop import main

if __name__ == "__main__":
    sys.exit(main())
