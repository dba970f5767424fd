"""alignd's gRPC services: generation, reward, reference and trainer.

Each service lives in its own package (config, servicer, engine, ``__main__``); what they share
(server bootstrap, interceptors, errors, metrics, auth, model loading, tokenization) lives in
:mod:`alignd_server.common`.
"""

from alignd import __version__

__all__ = ["__version__"]
