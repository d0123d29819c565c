"""Hugging Face Hub ids (`owner/name`) as checkpoint folders, through huggingface_hub's cache."""
from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# what a LlamaForCausalLM folder needs; never *.bin, *.pth or *.gguf copies of the same weights
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def is_hub_id(name: str) -> bool:
    """`owner/name` that is not a path on this machine (nor a missing `.gguf` file)."""
    return (bool(HUB_ID.fullmatch(name)) and not name.endswith(".gguf")
            and not os.path.exists(os.path.expanduser(name)))


def resolve(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot folder of `repo_id`: from the cache (HF_HUB_CACHE), downloaded if needed and
    allowed (HF_HUB_OFFLINE unset); one clear error if it is neither cached nor reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(f"{repo_id!r}: no such local path, and the Hugging Face Hub has no repository "
                                f"by that name that this login can read ({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id!r}: the Hugging Face Hub has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r}: no such local path, not in the Hugging Face cache, and the Hub is offline or "
            "unreachable (HF_HUB_OFFLINE=1, or no network); download it once online, or pass a local "
            "folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"{repo_id!r}: could not fetch it from the Hugging Face Hub ({e})") from None
