"""Runtime shared by every alignd service."""
