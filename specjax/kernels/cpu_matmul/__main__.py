"""``python -m specjax.kernels.cpu_matmul``: builds the CPU kernel (if needed) and prints the
library's path (``make setup`` / ``make test`` run it)."""

import sys

from specjax.kernels.cpu_matmul.build import main

sys.exit(main())
