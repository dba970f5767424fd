"""`python -m alignd_server.reward`: serve the reward service."""

import sys

from alignd_server.launch import main

sys.exit(main("reward"))
