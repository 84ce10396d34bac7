"""The one line a failed command prints: the problem, and what would be valid or what to do."""
from __future__ import annotations

import argparse
import errno

from .options import flag_of


# What a user can do about each way a run differs from its store (storage names the difference).
MISMATCH_ADVICE = {
    "contrast": "use --contrast {stored}",
    "dataset_name": "use --dataset {stored}",
    "preprocessing": "give the store's preprocessing (`saliency-atlas status STORE` shows it)",
    "image_shape": "give the store's --input-size",
    "samples": "use --samples {stored} or more (a run may add samples after the stored ones, not drop them)",
    "block_size": "use --block-size {stored}",
    "schema_version": "an older store is read by xarray but not extended; start a new --store",
    "params": "use the store's parameters (`saliency-atlas status STORE` lists them)",
}

DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}

DISK_ADVICE = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
               errno.EROFS: "choose a writable --store", errno.EACCES: "choose a --store you can write to"}

def error_line(e: Exception, args: argparse.Namespace) -> str:
    """One line for the user: the problem, and what would be valid or what to do."""
    import storage

    if isinstance(e, storage.StoreMismatch):
        advice = [MISMATCH_ADVICE[d.what].format(stored=d.stored) for d in e.differences if d.what in MISMATCH_ADVICE]
        text = "; ".join([*advice, "or use a new --store path"])
        return f"{e} {text[0].upper()}{text[1:]}."
    if isinstance(e, FileNotFoundError) and "no study store" in str(e) and \
            getattr(args, "command", "") in ("evaluate", "status", "figure", "aggregate", "clusters", "report"):
        try:  # a file, or a folder of other things: say so, not "make one there" (the study would refuse it)
            storage.check_path(args.store, "study")
        except (FileExistsError, ValueError) as found:
            return f"{found}".replace("give a new path or an existing store", "give the path of a study store")
        return f"{e}: make one with `saliency-atlas study --store {args.store}`"
    if isinstance(e, ImportError):  # an fsspec URL whose backend is not installed
        return f"{e} (the store {getattr(args, 'store', None)!r} is at a URL whose fsspec backend is not installed here)"
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:
        store = getattr(args, "store", None)
        return (f"{DISK_ERRORS[e.errno]} while writing {e.filename or store!r}; every block finished before "
                f"is kept (a block's flag is set only after its data): {DISK_ADVICE[e.errno]}, then rerun the same "
                "command to resume")
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    from tasks import OPTIONS
    from tasks.protocols import PROTOCOLS
    from tasks.spec import options_of

    command = getattr(args, "command", "")
    options = options_of(PROTOCOLS[command].spec) if command in PROTOCOLS else OPTIONS if command == "study" else {}
    first = message.split(" ", 1)[0]
    if first in options:  # the option as this command spells it
        message = flag_of(first, options) + message[len(first):]
    return message
