import sys

from spyre_cb.cli import main

sys.exit(main())
