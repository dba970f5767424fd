"""`python -m alignd_server.generation`: serve the generation service."""

import sys

from alignd_server.launch import main

sys.exit(main("generation"))
