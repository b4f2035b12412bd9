"""IPAM: IP pools, per-node blocks, allocations persisted on the node, leak GC.

    ipam = IPAM(node, EtcdBackend(store), state_dir)      # etcd mode: claim blocks
    ipam = IPAM(node, PodCIDRBackend(node, pod_cidrs))    # kubernetes mode: podCIDRs
    await ipam.start(); a = await ipam.allocate(container_id, "eth0", namespace=, pod=)
"""
from felix_agent.ipam.allocator import IPAM, BlockReport, IPAMReport
from felix_agent.ipam.backends import EtcdBackend, IPAMBackend, PodCIDRBackend
from felix_agent.ipam.blocks import block_capacity, blocks_from, next_free, usable_range
from felix_agent.ipam.errors import IPAMConfigError, IPAMError, IPAMExhausted, NoUsablePool, StateDirInUse
from felix_agent.ipam.state import DEFAULT_STATE_DIR, Allocation

__all__ = [
    "IPAM", "BlockReport", "IPAMReport", "EtcdBackend", "IPAMBackend", "PodCIDRBackend",
    "block_capacity", "blocks_from", "next_free", "usable_range", "IPAMConfigError", "IPAMError",
    "IPAMExhausted", "NoUsablePool", "StateDirInUse", "DEFAULT_STATE_DIR", "Allocation",
]
