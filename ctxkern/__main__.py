import sys

from ctxkern.cli import main

sys.exit(main())
