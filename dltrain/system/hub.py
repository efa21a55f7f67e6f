"""The Hugging Face hub: whether it can be reached from here (found in seconds), and loading a
model's files from a folder, the hub or its local cache.

The hub client retries a failed request for about a minute before it gives up; a machine with
no network (these, a cluster's compute nodes) would wait that long for a certain failure. One
TCP connection to the endpoint ($HF_ENDPOINT, else huggingface.co) within a few seconds says
whether to try the hub at all, or to take the local cache and say how to fill it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from dltrain.errors import UserError

HUB_CONNECT_SECONDS = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable() -> bool:
    """One TCP connection to the hub's endpoint, within HUB_CONNECT_SECONDS."""
    endpoint = urlparse(hub_endpoint())
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), HUB_CONNECT_SECONDS).close()
    except OSError:
        return False
    return True


def transformers_module(what: str):
    """transformers, or one message saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            f"{what} needs transformers, which is not installed: pip install transformers "
            "(or pip install 'dltrain[models]')."
        ) from None
    transformers.utils.logging.set_verbosity_error()  # its progress bars and notices
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_pretrained(loader, checkpoint: str, what: str):
    """`loader.from_pretrained(checkpoint)`: a local folder as it is; a hub id from the hub, or
    from the local cache when the hub cannot be reached — else one message, at once."""
    local = Path(checkpoint).expanduser()
    if local.is_dir():
        return loader.from_pretrained(str(local))
    online = hub_reachable()
    try:
        return loader.from_pretrained(checkpoint, local_files_only=not online)
    except OSError as exc:  # not found on the hub, not cached, not a model folder
        where = "" if online else f" ({hub_endpoint()} cannot be reached from here)"
        raise UserError(
            f"model.checkpoint: cannot load the {what} of '{checkpoint}'{where}: "
            f"{str(exc).splitlines()[0]} Give a folder saved with save_pretrained (the model's "
            "and tokenizer's files), or a hub id that is in the local cache ($HF_HOME)."
        ) from None


def check_checkpoint_available(checkpoint: str) -> None:
    """A Hugging Face checkpoint (folder or hub id) that can be neither read locally nor fetched
    is one message now, before any data is read — not after the tokenizer's first request."""
    if Path(checkpoint).expanduser().is_dir() or hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(checkpoint, "config.json"), str):
        return
    raise UserError(
        f"model.checkpoint: '{checkpoint}' is not a folder here, is not in the local Hugging "
        f"Face cache ($HF_HOME), and {hub_endpoint()} cannot be reached from here. Give a "
        "folder saved with save_pretrained (the model's and tokenizer's files), or fetch the "
        "model into the cache on a machine with network access."
    )
