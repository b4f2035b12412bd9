"""The node's IP allocator: pools -> the node's blocks -> one address per attachment.

Order of work for an allocation (all under one asyncio lock, so parallel CNI ADDs never
see a half-made decision):
  1. the attachment (container id, ifname) already has an address: return it (ADD retry);
  2. a free address in a block the node already owns (blocks of disabled pools excepted);
  3. otherwise claim a new block (EtcdBackend: create-if-absent on its affinity key) from
     the first enabled pool, by name, that has an unclaimed block, and use it;
  4. nothing left: IPAMExhausted.
The new state is on disk (StateFile.save) before the address is returned, so a restart
never forgets an address and never hands one out twice.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Iterable

from felix_agent.model import BlockAffinity, IPPool

from felix_agent.ipam.backends import IPAMBackend
from felix_agent.ipam.blocks import block_capacity, blocks_from, next_free, pool_network
from felix_agent.ipam.errors import IPAMConfigError, IPAMExhausted, NoUsablePool
from felix_agent.ipam.state import DEFAULT_STATE_DIR, Allocation, IPAMState, StateFile

log = logging.getLogger("tortie.ipam")


@dataclass(frozen=True)
class BlockReport:
    cidr: str
    pool: str
    capacity: int
    used: int
    usable: bool  # False when its pool is disabled


@dataclass(frozen=True)
class IPAMReport:
    """What `tortiectl ipam show` prints."""

    node: str
    blocks: tuple[BlockReport, ...]
    allocations: tuple[Allocation, ...]
    leaks: tuple[Allocation, ...]  # allocations whose container is not among the known ones


def _valid_attachments(valid: Iterable[str | tuple[str, str]]) -> tuple[set[str], set[tuple[str, str]]]:
    ids: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for v in valid:
        if isinstance(v, str):
            ids.add(v)
        else:
            cid, ifname = v
            pairs.add((cid, ifname))
    return ids, pairs


def _good_pools(pools: Iterable[IPPool]) -> dict[str, IPPool]:
    """Pools by name, malformed ones skipped with a warning: one bad pool must not stop
    allocation from the good ones."""
    good: dict[str, IPPool] = {}
    for p in pools:
        try:
            pool_network(p)
        except IPAMConfigError as e:
            log.warning("ignoring IP pool: %s", e)
            continue
        good[p.name] = p
    return good


class IPAM:
    """One node's IPAM.  `await start()` before use, `await close()` after.

    release_empty_blocks: when a release leaves a block empty and the node has other
    blocks, give the empty one back (delete its affinity) so other nodes can claim it.
    Off by default, as in Calico's normal mode: a node keeps its blocks, which keeps
    routes (one per block) stable while pods come and go.
    """

    def __init__(self, node: str, backend: IPAMBackend, state_dir: str = DEFAULT_STATE_DIR,
                 *, release_empty_blocks: bool = False, version: int = 4):
        if not node:
            raise IPAMConfigError("IPAM needs the node name")
        if version not in (4, 6):
            raise IPAMConfigError(f"IP version must be 4 or 6, not {version!r}")
        self.node = node
        self.backend = backend
        self.version = version
        self.release_empty_blocks = release_empty_blocks
        self._file = StateFile(state_dir)
        self._state = IPAMState(node=node)
        self._fed_pools: dict[str, IPPool] = {}  # from the agent (syncer, config default)
        self._backend_pools: dict[str, IPPool] = {}  # read from the backend on demand
        self._foreign: set[str] = set()  # local blocks the datastore no longer gives us
        # Claims made by this instance, numbered: refresh() reads the affinities without the
        # lock, so a block claimed while that read was under way is missing from it and must
        # not be taken for one the datastore no longer gives us.
        self._claim_seq = 0
        self._claimed_at: dict[str, int] = {}
        self._unseen: set[str] = set()  # claimed here, not yet in any affinity list seen
        self._lock = asyncio.Lock()
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._file.lock()
        try:
            self._state = await asyncio.to_thread(self._file.load, self.node)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - the datastore may be down at boot
                # The persisted blocks still serve allocations; new blocks wait for the
                # datastore.  Better than refusing every pod on this node.
                log.warning("IPAM could not read pools/blocks from the datastore (%s); "
                            "using the %d blocks known locally", e, len(self._state.blocks))
        except BaseException:
            self._file.unlock()
            raise
        self._started = True

    async def close(self) -> None:
        self._file.unlock()
        self._started = False

    async def __aenter__(self) -> "IPAM":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- pools and blocks from the datastore ------------------------------------------

    def set_pools(self, pools: Iterable[IPPool]) -> None:
        """Replace the pools the agent knows (its model's IPPools, the configured default
        pool).  They are merged with the backend's own pool list, these winning on a name
        clash, so a pool the datastore does not hold is usable too."""
        self._fed_pools = _good_pools(pools)

    @property
    def pools(self) -> list[IPPool]:
        merged = {**self._backend_pools, **self._fed_pools}
        return sorted(merged.values(), key=lambda p: p.name)

    def _pool(self, name: str) -> IPPool | None:
        return self._fed_pools.get(name) or self._backend_pools.get(name)

    async def refresh(self, affinities: Iterable[BlockAffinity] | None = None) -> None:
        """Re-read pools and this node's affinities from the backend, or take the
        affinities given (the agent's model, which its watch keeps current: a Node or block
        event then costs no read of every claim).  Blocks the datastore says are ours are
        adopted; local blocks the datastore no longer has for us are kept only while they
        hold allocations (and get no new ones)."""
        seq0 = self._claim_seq
        if affinities is not None:
            affs = list(affinities)
        else:
            if self.backend.claims_blocks:
                self._backend_pools = _good_pools(await self.backend.list_pools())
            affs = await self.backend.list_affinities()
        async with self._lock:
            mine = {a.cidr: a for a in affs if a.node == self.node}
            holders_of = {a.cidr for a in affs}
            for cidr, seq in self._claimed_at.items():
                # (one entry per block ever claimed by this process: a handful, kept)
                if cidr in mine:
                    self._unseen.discard(cidr)
                elif cidr in self._state.blocks and (seq >= seq0 or (
                        cidr in self._unseen and cidr not in holders_of)):
                    # Claimed after the list was read, or not yet echoed by the watch.
                    mine[cidr] = self._state.blocks[cidr]
            changed = False
            for cidr, aff in mine.items():
                if self._state.blocks.get(cidr) != aff:
                    self._state.blocks[cidr] = aff
                    changed = True
            for cidr in list(self._state.blocks):
                if cidr not in mine:
                    holders = [a for a in affs if a.cidr == cidr]
                    used = self._used(cidr)
                    if not holders and used and self.backend.claims_blocks and await self.backend.claim(
                            self._state.blocks[cidr]):
                        # The datastore lost it (e.g. wiped); we still hold addresses in it.
                        log.warning("re-claimed block %s, which holds %d allocations", cidr, len(used))
                        mine[cidr] = self._state.blocks[cidr]
                        continue
                    if holders:
                        log.error("block %s is claimed by node %s but this node has %d allocations in "
                                  "it; they are kept, no new ones are made", cidr, holders[0].node, len(used))
                    if not used:
                        del self._state.blocks[cidr]
                        self._state.cursors.pop(cidr, None)
                        changed = True
            self._foreign = {cidr for cidr in self._state.blocks if cidr not in mine}
            if changed:
                await self._save()

    # -- queries --------------------------------------------------------------------------

    def _used(self, cidr: str) -> set[str]:
        return {a.ip for a in self._state.allocations.values() if a.block == cidr}

    def _block_usable(self, cidr: str, version: int | None = None) -> bool:
        if cidr in self._foreign:
            return False
        if ipaddress.ip_network(cidr).version != (version or self.version):
            return False
        aff = self._state.blocks[cidr]
        pool = self._pool(aff.pool) if aff.pool else None
        # A pool we do not know (deleted, or the datastore was down at start) does not stop
        # the block: the affinity is ours.  A disabled pool gives no new addresses at all.
        return not (pool is not None and pool.disabled)

    def allocations(self) -> list[Allocation]:
        return sorted(self._state.allocations.values(), key=lambda a: (a.container_id, a.ifname, a.ip))

    def allocations_for(self, container_id: str, ifname: str | None = None) -> list[Allocation]:
        return [a for a in self.allocations()
                if a.container_id == container_id and (ifname is None or a.ifname == ifname)]

    def blocks(self) -> list[BlockAffinity]:
        return sorted(self._state.blocks.values(), key=lambda b: b.cidr)

    def families(self) -> tuple[int, ...]:
        """The IP versions an ADD gets one address of each: those of the enabled pools
        (etcd mode) or of this node's podCIDRs (kubernetes mode), so a dual-stack cluster
        gives every pod an IPv4 and an IPv6 address and an IPv6-only one IPv6 only.  With
        neither known, the IPAM's own version (the error then names it)."""
        if self.backend.claims_blocks:
            found = {pool_network(p).version for p in self.pools if not p.disabled}
        else:
            found = {ipaddress.ip_network(c).version for c in self._state.blocks if c not in self._foreign}
        return tuple(sorted(found)) or (self.version,)

    def status(self) -> tuple[bool, str]:
        """(True, "") when an ADD could get an address of every family now or by claiming
        a block."""
        for version in self.families():
            ok, why = self._status(version)
            if not ok:
                return ok, why
        return True, ""

    def _status(self, version: int) -> tuple[bool, str]:
        for cidr in self._state.blocks:
            if self._block_usable(cidr, version) and len(self._used(cidr)) < block_capacity(cidr):
                return True, ""
        if not self.backend.claims_blocks:
            if not self._state.blocks:
                return False, f"node {self.node} has no podCIDR yet (Node.spec.podCIDRs is empty)"
            return False, f"node {self.node}'s podCIDRs {', '.join(sorted(self._state.blocks))} are full"
        enabled = [p for p in self.pools if not p.disabled and pool_network(p).version == version]
        if not enabled:
            return False, "no enabled IPv%d pool" % version
        # Whether an unclaimed block exists needs the datastore; claim() finds out.
        return True, ""

    def show(self, known_container_ids: Iterable[str] | None = None) -> IPAMReport:
        blocks = []
        for aff in self.blocks():
            blocks.append(BlockReport(cidr=aff.cidr, pool=aff.pool, capacity=block_capacity(aff.cidr),
                                      used=len(self._used(aff.cidr)), usable=self._block_usable(aff.cidr, ipaddress.ip_network(aff.cidr).version)))
        allocs = tuple(self.allocations())
        leaks: tuple[Allocation, ...] = ()
        if known_container_ids is not None:
            known = set(known_container_ids)
            leaks = tuple(a for a in allocs if a.container_id not in known)
        return IPAMReport(node=self.node, blocks=tuple(blocks), allocations=allocs, leaks=leaks)

    # -- changes ---------------------------------------------------------------------------

    async def allocate_families(self, container_id: str, ifname: str = "eth0", *, namespace: str = "",
                                pod: str = "") -> list[Allocation]:
        """One address of each family (families()) for the attachment, IPv4 first: what a
        CNI ADD gets.  All or nothing: when one family fails, the addresses this call made
        are released again (a retried ADD's existing ones stay) and the error is raised."""
        made: list[Allocation] = []
        out: list[Allocation] = []
        for version in self.families():
            before = {a.ip for a in self.allocations_for(container_id, ifname)}
            try:
                a = await self.allocate(container_id, ifname, namespace=namespace, pod=pod, version=version)
            except BaseException:
                if made:
                    await self.release_ips(a.ip for a in made)
                raise
            if a.ip not in before:
                made.append(a)
            out.append(a)
        return out

    async def allocate(self, container_id: str, ifname: str = "eth0", *, namespace: str = "",
                       pod: str = "", version: int | None = None) -> Allocation:
        """One address of IP version `version` (default: the IPAM's) for the attachment."""
        if not container_id or not ifname:
            raise IPAMConfigError("an allocation needs a container id and an interface name")
        version = version or self.version
        if version not in (4, 6):
            raise IPAMConfigError(f"IP version must be 4 or 6, not {version!r}")
        self._check_started()
        async with self._lock:
            for a in self._state.allocations.values():
                if (a.container_id == container_id and a.ifname == ifname
                        and ipaddress.ip_address(a.ip).version == version):
                    return a  # a retried ADD gets the address it already has
            ip, cidr = self._find_free(version)
            if ip is None:
                cidr = await self._claim_block(version)
                ip = next_free(cidr, self._used(cidr), None)
                assert ip is not None, "a freshly claimed block has free addresses"
            alloc = Allocation(ip=ip, block=cidr, container_id=container_id, ifname=ifname,
                               namespace=namespace, pod=pod, created=round(time.time(), 3))
            self._state.allocations[ip] = alloc
            old_cursor = self._state.cursors.get(cidr)
            self._state.cursors[cidr] = ip
            try:
                await self._save()
            except BaseException:
                # Not on disk: not handed out either.
                del self._state.allocations[ip]
                if old_cursor is None:
                    self._state.cursors.pop(cidr, None)
                else:
                    self._state.cursors[cidr] = old_cursor
                raise
            log.info("allocated %s (block %s) to %s/%s", ip, cidr, container_id, ifname)
            return alloc

    async def release(self, container_id: str, ifname: str | None = None) -> list[Allocation]:
        """Free the attachment's address(es); nothing to free is not an error (CNI DEL)."""
        self._check_started()
        async with self._lock:
            gone = [a for a in self._state.allocations.values()
                    if a.container_id == container_id and (ifname is None or a.ifname == ifname)]
            await self._drop(gone)
            return gone

    async def release_ips(self, ips: Iterable[str]) -> list[Allocation]:
        self._check_started()
        async with self._lock:
            gone = [self._state.allocations[ip] for ip in set(ips) if ip in self._state.allocations]
            await self._drop(gone)
            return gone

    def unattached(self, valid: Iterable[str | tuple[str, str]]) -> list[Allocation]:
        """The allocations whose attachment is not in `valid` (see gc), without freeing them."""
        ids, pairs = _valid_attachments(valid)
        return [a for a in self.allocations() if a.container_id not in ids and a.attachment not in pairs]

    async def gc(self, valid: Iterable[str | tuple[str, str]]) -> list[Allocation]:
        """Free every allocation whose attachment is not valid.  `valid` holds container ids
        (every interface of the container stays) and/or (container id, ifname) pairs (CNI
        GC's cni.dev/valid-attachments).  Returns what was freed."""
        self._check_started()
        valid = list(valid)
        async with self._lock:
            gone = self.unattached(valid)
            await self._drop(gone)
            if gone:
                log.info("IPAM GC freed %d leaked addresses: %s", len(gone), ", ".join(a.ip for a in gone))
            return gone

    # -- internals -------------------------------------------------------------------------

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("IPAM.start() was not awaited")

    def _find_free(self, version: int) -> tuple[str | None, str]:
        used: dict[str, set[str]] = {}
        for a in self._state.allocations.values():  # one pass, not one per block
            used.setdefault(a.block, set()).add(a.ip)
        for aff in self.blocks():
            if not self._block_usable(aff.cidr, version):
                continue
            ip = next_free(aff.cidr, used.get(aff.cidr, set()), self._state.cursors.get(aff.cidr))
            if ip is not None:
                return ip, aff.cidr
        return None, ""

    async def _claim_block(self, version: int) -> str:
        """Claim a new block of IP version `version` for this node (caller holds the lock)."""
        if not self.backend.claims_blocks:
            if not self._state.blocks:
                raise NoUsablePool(f"node {self.node} has no podCIDR (Node.spec.podCIDRs is empty)")
            raise IPAMExhausted(f"node {self.node}'s podCIDRs {', '.join(sorted(self._state.blocks))} "
                                "are exhausted: every address is allocated")
        self._backend_pools = _good_pools(await self.backend.list_pools())
        enabled = [p for p in self.pools if not p.disabled and pool_network(p).version == version]
        if not enabled:
            raise NoUsablePool(f"no enabled IPv{version} IP pool to allocate from "
                               f"(pools: {', '.join(p.name for p in self.pools) or 'none'})")
        taken = {a.cidr for a in await self.backend.list_affinities()}
        for pool in enabled:
            for cidr in blocks_from(pool, self.node):
                if cidr in taken or cidr in self._state.blocks:
                    continue
                aff = BlockAffinity(cidr=cidr, node=self.node, pool=pool.name)
                if await self.backend.claim(aff):
                    self._state.blocks[cidr] = aff
                    self._claimed_at[cidr] = self._claim_seq
                    self._claim_seq += 1
                    self._unseen.add(cidr)
                    log.info("claimed block %s from pool %s", cidr, pool.name)
                    return cidr
                # Another node won this block a moment ago: try the next one.
                log.info("block %s was claimed by another node a moment ago; trying the next", cidr)
        names = ", ".join(p.name for p in enabled)
        raise IPAMExhausted(f"IP pool(s) {names} exhausted: every address of node {self.node}'s "
                            f"{len(self._state.blocks)} block(s) is allocated and no unclaimed "
                            "block is left")

    async def _drop(self, gone: list[Allocation]) -> None:
        if not gone:
            return
        for a in gone:
            del self._state.allocations[a.ip]
        try:
            await self._save()
        except BaseException:
            for a in gone:
                self._state.allocations[a.ip] = a
            raise
        if self.release_empty_blocks:
            await self._release_empty({a.block for a in gone})

    async def _release_empty(self, candidates: set[str]) -> None:
        for cidr in sorted(candidates):
            if cidr not in self._state.blocks or self._used(cidr) or len(self._state.blocks) <= 1:
                continue
            aff = self._state.blocks[cidr]
            # Forget it locally first, on disk: a crash after the datastore delete must not
            # leave us allocating from a block another node may claim next.
            del self._state.blocks[cidr]
            self._state.cursors.pop(cidr, None)
            await self._save()
            try:
                await self.backend.unclaim(aff)
                log.info("released empty block %s", cidr)
            except Exception as e:  # noqa: BLE001
                log.warning("could not release empty block %s (%s); it stays claimed", cidr, e)

    async def _save(self) -> None:
        data = self._state.to_json()  # serialised here, under the lock, on the loop thread
        await asyncio.to_thread(self._file.save, data)
