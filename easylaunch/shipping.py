"""How code reaches a target: the content-addressed snapshot and the easylaunch/cloudpickle zips.

One function for every mode that runs code anywhere but in the launcher's own interpreter::

    shipment = ship(batch, log_root / ".snapshots", zips=True)
    shipment.zips        # [.../easylaunch-<sha>.zip, .../cloudpickle-3.1.2-<sha>.zip]
    # the payloads now name the snapshot (batch.payload_snapshot); the runner activates it

Everything is written once per content, so a second sweep of the same code ships nothing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .batch import Batch


@dataclass
class Shipment:
    """What :func:`ship` put in the store."""

    snapshot: Optional[dict] = None
    zips: List[Path] = field(default_factory=list)


def ship(
    batch: Batch,
    store: Path,
    zips: bool = False,
    include_easylaunch: bool = False,
    same_machine: bool = True,
) -> Shipment:
    """Snapshot the batch's code dirs into ``store`` and point its payloads at the snapshot.

    ``zips`` adds easylaunch and cloudpickle as zips (targets that lack them: containers,
    clusters); ``include_easylaunch`` also puts easylaunch inside the snapshot (bundles'
    stand-alone unpacker). Without code dirs the payloads name the launcher's import roots
    when the target is this machine (``same_machine``), else nothing.
    """
    from .selfzip import cloudpickle_zip, easylaunch_zip

    store.mkdir(parents=True, exist_ok=True)
    shipment = Shipment()
    code_dirs = [] if batch.reuse_snapshot else batch.code_dirs()
    if batch.reuse_snapshot:
        shipment.snapshot = reuse(batch.reuse_snapshot, store, include_easylaunch)
    elif code_dirs:
        from . import snapshot

        shipment.snapshot = snapshot.create(
            code_dirs, store, include_easylaunch=include_easylaunch, **snapshot_rules(batch)
        )
    if shipment.snapshot:
        # the archive's path helps only where it is; elsewhere the runner looks next to its runs
        batch.payload_snapshot = {
            k: v for k, v in shipment.snapshot.items() if same_machine or k != "archive"
        }
    elif same_machine:
        from .modes.process import launcher_sys_path

        batch.payload_sys_path = launcher_sys_path()
    else:
        batch.payload_sys_path = []  # launcher paths mean nothing there
    if zips:
        shipment.zips = [easylaunch_zip(store), cloudpickle_zip(store)]
    return shipment


def snapshot_rules(batch: Batch) -> dict:
    """The config's ``SNAPSHOT_EXCLUDE`` / ``SNAPSHOT_INCLUDE`` patterns, as snapshot.create takes them."""
    return {
        "exclude": list(batch.settings.get("SNAPSHOT_EXCLUDE") or ()),
        "include": list(batch.settings.get("SNAPSHOT_INCLUDE") or ()),
    }


def keep_local(batch: Batch, store: Path) -> None:
    """Local modes: the runners import the live code (as a plain ``python`` would, data files
    beside it included) and the code dirs are snapshotted into ``store`` for the record
    (``kept_snapshot`` in the payloads, ``code_snapshot`` in the manifests): a relaunch and a
    result read later use what ran. A relaunch's runners run the reused snapshot itself::

        keep_local(batch, batch.log_root / ".snapshots")

    Stored once per content (a second launch of the same code writes nothing). Code too large to
    snapshot (``$EASYLAUNCH_SNAPSHOT_MAX_MB``) is a warning here, not an error: the run goes on.
    """
    from . import snapshot
    from .modes.process import launcher_sys_path

    batch.payload_sys_path = launcher_sys_path()
    if batch.reuse_snapshot:
        batch.payload_snapshot = reuse(batch.reuse_snapshot, store, include_easylaunch=False)
        return
    code_dirs = batch.code_dirs()
    if not code_dirs:
        return
    try:
        store.mkdir(parents=True, exist_ok=True)
        batch.kept_snapshot = snapshot.create(
            code_dirs, store, include_easylaunch=False, **snapshot_rules(batch)
        )
    except (ValueError, OSError, snapshot.SnapshotError) as exc:
        warnings.warn(
            f"easylaunch: no code snapshot kept for this launch ({exc}); a relaunch of its runs "
            "will run the code as it is then",
            stacklevel=2,
        )


def reuse(info: dict, store: Path, include_easylaunch: bool = False) -> dict:
    """A relaunched run's snapshot ``info`` (its ``archive`` located), with the archive in
    ``store`` (hard-linked, else copied, when it lies elsewhere); nothing is snapshotted anew."""
    from . import snapshot

    if include_easylaunch and not info.get("easylaunch_root"):
        raise snapshot.SnapshotError(
            f"the code snapshot {str(info.get('id'))[:12]} of the relaunched run has no copy of easylaunch, "
            "which a bundle needs: launch the experiment again from its script instead"
        )
    name = str(info.get("archive_name") or f"{info.get('id')}.tar.gz")
    source = Path(str(info["archive"]))
    target = Path(os.path.abspath(store)) / name
    store.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        try:
            os.link(source, target)
        except FileExistsError:
            pass
        except OSError:  # another file system: a private copy
            from .records import atomic_write_bytes

            atomic_write_bytes(target, source.read_bytes(), 0o600)
    if include_easylaunch:
        snapshot._install_bootstrap(store)
    return {**info, "archive": str(target), "written": False}
