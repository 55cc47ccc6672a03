import sys

from filter_worker.cli import main

sys.exit(main())
