"""Hugging Face hub ids -> local snapshot directories, at the edge: the engine only ever sees directories.

A path that is an existing directory is used as is. Anything else is a hub repository id, resolved with
``huggingface_hub.snapshot_download`` at the given revision (branch, tag or commit sha). That honours the
hub cache (``HF_HOME``, ``HF_HUB_CACHE``, or ``cache_dir`` from ``--transformers-cache``) and
``HF_HUB_OFFLINE=1`` (cache only); online, missing files are downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ..reference import ModelPath
from .loader import ModelLoadError

# Files a merge reads: weights, configs, tokenizer files (sentencepiece, BPE merges, tiktoken, Jinja templates).
WEIGHT_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
PICKLE_PATTERNS = ["*.bin"]


def download_command(repo: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The download command of the installed huggingface_hub (`hf` since 0.34; `huggingface-cli` before)."""
    import huggingface_hub

    major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    tool = "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
    return (f"{tool} {repo}" + (f" --revision {revision}" if revision else "")
            + (f" --cache-dir {cache_dir}" if cache_dir else ""))


def looks_local(path: str) -> bool:
    """Paths that cannot be hub ids (`org/name`, or a legacy `name` such as `gpt2`)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def resolve_model_dir(ref: ModelPath, *, cache_dir: str | None = None, allow_pickle: bool = False,
                      what: str = "model") -> Path:
    """The local directory holding `ref`: the directory itself, or the hub snapshot of `ref.revision`."""
    local = Path(ref.path).expanduser()
    if local.is_dir() and ref.revision is None:
        return local
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{what} {str(ref)!r}: expected a model directory, got a file")
    if looks_local(ref.path):
        hint = "" if ref.revision is None else " (a local directory cannot have an @revision)"
        raise ModelLoadError(f"{what} {str(ref)!r} not found: no such directory{hint}. Check the path in the "
                             "recipe (relative paths are resolved from the current directory), or give a hub id "
                             "as org/name[@revision]")
    return _snapshot(ref, cache_dir, allow_pickle, what)


def _snapshot(ref: ModelPath, cache_dir: str | None, allow_pickle: bool, what: str) -> Path:
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline = constants.HF_HUB_OFFLINE
    cache = cache_dir or constants.HF_HUB_CACHE
    patterns = WEIGHT_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = huggingface_hub.snapshot_download(ref.path, revision=ref.revision, cache_dir=cache_dir,
                                                 allow_patterns=patterns, local_files_only=offline)
    except errors.HFValidationError as e:
        raise ModelLoadError(f"{what} {str(ref)!r} is neither a local directory nor a valid hub id: {e}") from None
    except errors.LocalEntryNotFoundError:
        if offline:
            raise ModelLoadError(
                f"{what} {str(ref)!r} is no local directory and not in the Hugging Face cache {cache}, and "
                f"HF_HUB_OFFLINE=1 forbids downloading it: "
                f"run `{download_command(ref.path, ref.revision, cache_dir)}` (with HF_HUB_OFFLINE unset), or "
                "unset HF_HUB_OFFLINE so that the merge downloads it") from None
        raise ModelLoadError(f"{what} {str(ref)!r}: could not reach the Hugging Face hub and it is not in the "
                             f"cache {cache}; check the network, or run `{download_command(ref.path, ref.revision)}`"
                             " where the hub is reachable") from None
    except errors.RevisionNotFoundError:
        raise ModelLoadError(f"{what} {str(ref)!r}: repository {ref.path!r} has no revision {ref.revision!r} "
                             "(a branch, tag or commit sha)") from None
    except errors.RepositoryNotFoundError:
        raise ModelLoadError(f"{what} {str(ref)!r}: no such repository on the Hugging Face hub, or it is "
                             "private or gated (log in with `hf auth login`) and not a local directory "
                             "either") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"{what} {str(ref)!r}: download from the Hugging Face hub failed: {e}") from None
    return Path(path)
