"""This node's records and each peer's of what they share, over the peers' query and
audit endpoints: the checkpoints of this node a peer witnessed, and reconciliation of
shared transfers, batches and the audit log (``yigong audit reconcile`` and the
officer's console page)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway import pki
from gateway.audit import verify_log
from gateway.audit_witness import Witnessed
from gateway.catalog import Catalog
from gateway.config import NodeConfig
from gateway.errors import YigongError
from gateway.reconcile import Finding, SharedBatch, SharedTransfer, reconcile
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.client import NodeClient
from gateway.rpc.witness import GrpcWitnessLink


def node_verifier(cfg: NodeConfig) -> Any:
    cert = pki.load_certificate(cfg.tls.cert)
    return lambda data, sig: pki.verify_signature(cert, data, sig)


def witnessed_by_peers(
    cfg: NodeConfig, peers: list[str]
) -> tuple[dict[str, list[Witnessed]], dict[str, str]]:
    """Every checkpoint of this node each peer holds; and the peers that could not answer."""
    creds = ClientCredentials.from_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    found: dict[str, list[Witnessed]] = {}
    failed: dict[str, str] = {}
    for peer in peers:
        try:
            link = GrpcWitnessLink(peer, cfg.peer(peer).address, creds)
            try:
                found[peer] = link.witnessed(cfg.node.id)
            finally:
                link.close()
        except YigongError as exc:
            failed[peer] = str(exc)
    return found, failed


PAGE = 1000  # the query endpoint's largest page
T = TypeVar("T")


def _paged(fetch: Callable[[str], Sequence[Any]], shared: Callable[[Any], T]) -> list[T]:
    """Every record of a listing newest first, a page at a time (``fetch(until)``: the
    records created before ``until``, "" for the newest), each made ``shared``."""
    found: list[T] = []
    until = ""
    while True:
        page = fetch(until)
        found += [shared(r) for r in page]
        if len(page) < PAGE:
            return found
        until = min(r.created_at for r in page)  # the next page: strictly older


def _transfer(t: Any, receipt: bytes | None) -> SharedTransfer:
    """One side's record of a transfer (a catalog row or a query answer)."""
    return SharedTransfer(
        t.transfer_id, t.direction, t.peer_node, t.object_id, t.size, t.status, receipt, t.batch_id
    )


def _remote(cfg: NodeConfig, peer_id: str) -> tuple[list[SharedTransfer], list[SharedBatch]]:
    """The peer's records of the transfers and batches it shares with this node (as a
    peer node, this node is shown only those), over one connection."""

    def receipt(m: Any) -> bytes | None:
        return m.receipt.SerializeToString() if m.HasField("receipt") else None

    creds = ClientCredentials.from_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    with NodeClient(cfg.peer(peer_id).address, creds, node_id=peer_id) as client:
        transfers = _paged(
            lambda until: client.list_transfers(until=until, limit=PAGE),
            lambda t: _transfer(t, receipt(t)),
        )
        batches = _paged(
            lambda until: client.list_batches(until=until, limit=PAGE),
            lambda b: SharedBatch(b.batch_id, b.direction, b.peer_node, b.status, receipt(b)),
        )
    return transfers, batches


def _local(cfg: NodeConfig, peer_id: str) -> tuple[list[SharedTransfer], list[SharedBatch]]:
    """This node's records of what it shares with ``peer_id``."""
    catalog = Catalog.for_config(cfg)
    try:
        transfers = _paged(
            lambda until: catalog.list_transfers(peer=peer_id, until=until, limit=PAGE),
            lambda t: _transfer(t, t.receipt),
        )
        batches = _paged(
            lambda until: catalog.list_batches(peer=peer_id, until=until, limit=PAGE),
            lambda b: SharedBatch(b.batch_id, b.direction, b.peer_node, b.status, b.receipt),
        )
    finally:
        catalog.close()
    return transfers, batches


def reconcile_peers(
    cfg: NodeConfig, peers: list[str]
) -> tuple[dict[str, list[Finding]], dict[str, str]]:
    """Reconcile this node's shared transfers, batches and audit log with each peer's
    records (over the peers' query endpoints): the findings and a line on the audit log
    per peer. Used by ``yigong audit reconcile`` and the officer's console page."""
    trust = pki.TrustStore(cfg.tls.ca, cfg.tls.crl)
    results: dict[str, list[Finding]] = {}
    logs: dict[str, str] = {}
    for peer in peers:
        (ours, our_batches), (theirs, their_batches) = _local(cfg, peer), _remote(cfg, peer)
        results[peer] = reconcile(
            cfg.node.id, peer, ours, theirs, trust, our_batches, their_batches
        )
        found, failed = witnessed_by_peers(cfg, [peer])
        if peer in failed:
            why = f"cannot ask {peer} for the checkpoints it witnessed: {failed[peer]}"
            results[peer].append(Finding("audit_log", "", why))
            logs[peer] = f"{cfg.node.id} <-> {peer}: audit log INCOMPLETE: {why}"
            continue
        held = found[peer]
        report = verify_log(
            cfg,
            cfg.node.id,
            verify_signature=node_verifier(cfg),
            extra_checkpoints=[w.checkpoint for w in held],
        )
        if not report.ok:
            results[peer].append(Finding("audit_log", "", report.reason))
            logs[peer] = f"{cfg.node.id} <-> {peer}: audit log FAILED: {report.reason}"
        elif held:
            logs[peer] = (
                f"{cfg.node.id} <-> {peer}: audit log matches the {len(held)} checkpoint(s) "
                f"{peer} witnessed (newest at entry {held[-1].checkpoint.seq})"
            )
        else:
            logs[peer] = f"{cfg.node.id} <-> {peer}: {peer} has witnessed no audit checkpoint yet"
    return results, logs


