"""The upstream e2e specs of the same release (test/e2e of v1.20.2, built as e2e.test by
deploy/kube/build.sh) against a KubeLab, run from the control-plane namespace.

Groups (each one ginkgo run: a focus regex and a skip regex; the spec names are in GROUPS):
  netpol    every NetworkPolicy spec
  pods      `Networking Granular Checks: Pods`: pod to pod (intra-pod) and node to pod,
            http and udp, across both nodes
  services  Services of type ClusterIP (and the NodePorts the granular checks use) through
            kube-proxy in each node namespace
  hostport  a hostPort through the conflist's chained portmap plugin

Suites (E2E_UPSTREAM selects one, or a comma list: E2E_UPSTREAM=pods,hostport; `make e2e`
runs "netpol" unless told otherwise):
  smoke    a handful of NetworkPolicy specs across nodes, pod-to-pod and ClusterIP (CI)
  netpol   the netpol group           pods / services / hostport   that group alone
  network  netpol + pods + services + hostport (every sig-network spec named here; "full" too)
  none     skip the upstream specs

Known tortie failure (kept in "services" so that it shows): "Services should be rejected
when no endpoints exist".  kube-proxy REJECTs a new connection to a Service without
endpoints in filter FORWARD (KUBE-SERVICES), but tortie's cali-FORWARD, first in FORWARD,
ends in `-i cali+ -j ACCEPT` / `-o cali+ -j ACCEPT`, so a pod's packet is accepted before
kube-proxy sees it and the client times out instead of being refused.  Felix instead sets
its accept mark, returns, and ACCEPTs marked packets in a rule it keeps LAST in FORWARD.

Focused but skipped by the spec itself: Granular Checks: Services "should function for
pod-Service(hostNetwork): udp" (upstream's own Skipf, kubernetes issue 95565).

Measured (2 shared cores, one `make e2e E2E_UPSTREAM=smoke,pods,hostport,services`, all four
after tortie's own checks, 38 min in all): smoke 7/7 in 388 s, pods 4/4 in 93 s, hostport 1/1
in 38 s, services 39 passed of 40 run in 1360 s (the failure above); netpol 29/29 in 2431 s
(an earlier run); the root namespace unchanged and nothing left after each.

Specs left out on purpose, with why:
  - SCTP ([Feature:SCTP], sctp variants): this kernel has no SCTP module.
  - [Disruptive] (restart kube-proxy / the API server, delete its iptables rules), [Slow],
    [Feature:...], LoadBalancer/ESIPP and IPv6 dual-stack: a cloud, a second family or
    a disruption this lab does not have.
  - The changes from ClusterIP or NodePort to ExternalName: they resolve the Service name to
    a CNAME, which the lab's cluster DNS (tests/kube/cluster_dns.py, standing in for CoreDNS)
    does not serve.  Every other spec that names a Service by DNS runs against it.
  - SchedulerPredicates "validates that there exists conflict between pods with same
    hostPort and protocol but one using 0.0.0.0 hostIP": a scheduler-only check that waits
    ~5 minutes for a pod NOT to be scheduled; no packet goes through the network.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

# what no group here can run (see above)
_NEVER = r"SCTP|\[Disruptive\]|\[Slow\]|\[Feature:|IPv6DualStack|LoadBalancer|ESIPP"


def _any(*names: str) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


GROUPS: dict[str, tuple[str, str]] = {
    "netpol": ("NetworkPolicy", "SCTP"),
    "pods": (r"\[sig-network\] Networking Granular Checks: Pods", _NEVER),
    "services": (r"\[sig-network\] (Networking Granular Checks: Services |Services |Networking |Conntrack )" + _any(
        # Granular Checks: Services (pod/node/endpoint to Service, http and udp, NodePort udp,
        # endpoint updates, large requests, clientIP affinity, hostNetwork endpoints)
        "should function for", "should update endpoints", "should be able to handle large requests",
        "should support basic nodePort: udp functionality", "service endpoints using hostNetwork",
        # Services: ClusterIP through kube-proxy
        "should provide secure master service", "should serve a basic endpoint from pods",
        "should serve multiport endpoints from pods", "should preserve source pod IP for traffic thru service cluster IP",
        "should be able to up and down services", "should implement service.kubernetes.io/service-proxy-name",
        "should implement service.kubernetes.io/headless", "should be rejected when no endpoints exist",
        "should release NodePorts on delete",
        # ... and by name through the lab's cluster DNS
        "should allow pods to hairpin back to themselves through services",
        "should have session affinity work for service with type clusterIP",
        "should have session affinity timeout work for service with type clusterIP",
        "should be able to switch session affinity for service with type clusterIP",
        "should be able to change the type from ExternalName to ClusterIP",
        "should create endpoints for unready pods",
        # NodePort (kube-proxy's other half) on the node addresses
        "should be able to create a functioning NodePort service",
        "should be able to change the type from ExternalName to NodePort",
        "should be able to update service type to NodePort listening on same port number but different protocols",
        "should have session affinity work for NodePort service",
        "should have session affinity timeout work for NodePort service",
        "should be able to switch session affinity for NodePort service",
        # Networking: kube-proxy's own endpoints, the API's static paths
        "should check kube-proxy urls", "should provide unchanging, static URL paths for kubernetes api services",
        # Conntrack: UDP flows through a Service while the server pod is replaced
        "should be able to preserve UDP traffic when server pod cycles"), _NEVER),
    "hostport": (r"validates that there is no conflict between pods with same hostPort but different hostIP and protocol",
                 _NEVER),
}
SUITES: dict[str, list[tuple[str, str]]] = {
    # CI: four NetworkPolicy specs, pod to pod across nodes, a ClusterIP Service through
    # kube-proxy (and kube-proxy's REJECT of one without endpoints: our FORWARD order) and a
    # hostPort through portmap, in one run (about 4 minutes)
    "smoke": [("(NetworkPolicy.*(should support a 'default-deny-ingress' policy|"
               "should enforce policy to allow traffic from pods within server namespace based on PodSelector|"
               "should enforce policy based on Ports|should deny ingress access to updated pod)"
               "|Granular Checks: Pods should function for intra-pod communication: http"
               "|Granular Checks: Services should function for pod-Service: http"
               "|Services should be rejected when no endpoints exist"
               "|" + GROUPS["hostport"][0] + ")", "SCTP")],
    **{name: [g] for name, g in GROUPS.items()},
    "network": list(GROUPS.values()),
    "full": list(GROUPS.values()),  # the Makefile's older name for "network"
}


def suite(names: str) -> list[tuple[str, str]]:
    """The (focus, skip) runs of a suite name or a comma list of them."""
    out = []
    for name in names.split(","):
        if name not in SUITES:
            raise SystemExit(f"unknown upstream suite {name!r}; known: {', '.join([*SUITES, 'none'])}")
        out += SUITES[name]
    return out


@dataclass
class Result:
    focus: str
    ran: int
    passed: int
    failed: int
    skipped: int
    failures: list[str]
    seconds: float
    log: str


# The "Networking" specs of test/e2e/network first GET http://google.com from the runner, "not
# really a test of kubernetes" (its own comment) and not a thing the lab may do: the runner gets
# a private /etc/hosts naming google.com as the control-plane address, where a one-line HTTP
# server answers for the run.  Nothing leaves the lab's namespaces.
INTERNET_CHECK_HOST = "google.com"
_SERVE = ("import sys, functools, http.server as h; "
          "s = h.ThreadingHTTPServer((sys.argv[1], 80), functools.partial(h.SimpleHTTPRequestHandler, directory=sys.argv[2])); "
          "print('listening', flush=True); s.serve_forever()")


def _internet_standin(lab, report_dir: str) -> tuple[list[str], subprocess.Popen]:
    """The runner's command prefix (a mount namespace with the lab's /etc/hosts) and the
    HTTP server on the control-plane address; the caller stops the server."""
    from tests.kube.cluster import CP_IP
    hosts = os.path.join(report_dir, "hosts")
    with open(hosts, "w") as f:
        f.write(f"127.0.0.1 localhost\n{CP_IP} {INTERNET_CHECK_HOST}\n")
    www = os.path.join(report_dir, "www")
    os.makedirs(www, exist_ok=True)
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.cp}", sys.executable, "-c", _SERVE, CP_IP, www],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if server.stdout.readline().strip() != "listening":  # the runner must not start before it
        server.wait(10)
        raise RuntimeError(f"the internet check's stand-in HTTP server on {CP_IP}:80 did not start")
    prefix = ["nsenter", f"--net=/run/netns/{lab.cp}", "unshare", "--mount", "--propagation", "private",
              "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts]
    return prefix, server


def run_suite(lab, focus: str, skip: str, report_dir: str, timeout: float = 3600) -> Result:
    os.makedirs(report_dir, exist_ok=True)
    log = os.path.join(report_dir, "e2e.log")
    prefix, server = _internet_standin(lab, report_dir)
    argv = [*prefix, lab.bin("e2e.test"),
            f"--kubeconfig={lab.kubeconfig}", "--provider=skeleton", "--num-nodes=2",
            # the same release's kubectl (the specs exec through it), not whatever is on PATH
            f"--kubectl-path={lab.bin('kubectl')}",
            f"--ginkgo.focus={focus}", f"--ginkgo.skip={skip}", "--ginkgo.noColor",
            f"--report-dir={report_dir}", "--disable-log-dump", "--ginkgo.flakeAttempts=1"]
    t0 = time.monotonic()
    try:
        with open(log, "w") as f:
            subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=report_dir, timeout=timeout)
    finally:
        server.terminate()
        server.wait(10)
    took = time.monotonic() - t0
    text = open(log, errors="replace").read()
    m = re.search(r"Ran (\d+) of \d+ Specs.*?\n.*?(\d+) Passed \| (\d+) Failed \| \d+ Pending \| (\d+) Skipped", text, re.S)
    ran, passed, failed, skipped = (int(x) for x in m.groups()) if m else (0, 0, 0, 0)
    failures = re.findall(r"^\[Fail\] (.*)$", text, re.M)
    if not m:
        failures.append(f"no ginkgo summary; the log ends: {text[-2000:]}")
    return Result(focus, ran, passed, failed, skipped, failures, took, log)


@dataclass
class SuiteRun:
    """Every focus set of one suite, run in turn."""
    suite: str
    results: list[Result]

    @property
    def failures(self) -> list[str]:
        return [f for r in self.results for f in r.failures] + \
               [f"{r.focus}: no spec ran" for r in self.results if r.ran == 0]

    @property
    def summary(self) -> str:
        return "\n".join(f"{r.focus[:60]!r}: ran {r.ran}, passed {r.passed}, failed {r.failed} in {r.seconds:.0f}s"
                         f" ({r.log})" for r in self.results)


def run_named(lab, names: str, report_dir: str) -> SuiteRun:
    """The suite `names` (one name or a comma list, see suite()) against `lab`, one report
    dir per focus set; summary.txt in report_dir."""
    out = SuiteRun(names, [run_suite(lab, focus, skip, os.path.join(report_dir, str(i)))
                           for i, (focus, skip) in enumerate(suite(names))])
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "summary.txt"), "w") as f:
        f.write(out.summary + "\n" + "\n".join(out.failures) + "\n")
    return out


def check_suite_from_env(lab) -> None:
    """The body of a pytest test: the suite E2E_UPSTREAM names (default netpol) against
    `lab`, reports under E2E_REPORT_DIR; skips for "none", fails on any failed spec."""
    import pytest
    names = os.environ.get("E2E_UPSTREAM", "netpol")
    if names == "none":
        pytest.skip("E2E_UPSTREAM=none")
    out = run_named(lab, names, os.environ.get("E2E_REPORT_DIR", f"/var/tmp/tortie-e2e/{lab.prefix}"))
    print(f"\nupstream e2e ({names}):\n{out.summary}")
    assert not out.failures, out.summary + "\n" + "\n".join(out.failures)


def main(argv: list[str]) -> int:
    """python -m tests.kube.upstream <prefix of a running cluster> [suite] [report dir]"""
    import sys
    from tests.kube.cluster import KubeLab
    if not argv:
        print(main.__doc__, file=sys.stderr)
        return 2
    lab = KubeLab.attach(argv[0])
    names = argv[1] if len(argv) > 1 else "netpol"
    out = run_named(lab, names, argv[2] if len(argv) > 2 else
                    f"/var/tmp/tortie-e2e/{lab.prefix}-{names.replace(',', '+')}")
    print(out.summary)
    for f in out.failures:
        print(f"  FAIL {f}")
    return 1 if out.failures else 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
