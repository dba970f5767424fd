"""`python -m alignd_server.reference`: serve the reference service."""

import sys

from alignd_server.launch import main

sys.exit(main("reference"))
