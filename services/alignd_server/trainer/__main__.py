"""`python -m alignd_server.trainer`: serve the trainer service."""

import sys

from alignd_server.launch import main

sys.exit(main("trainer"))
