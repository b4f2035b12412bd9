"""The upstream e2e specs of the same release (test/e2e of v1.20.2, built as e2e.test by
deploy/kube/build.sh) against a KubeLab, run from the control-plane namespace.

Suites (E2E_UPSTREAM selects; `make e2e` runs "netpol" unless told otherwise):
  smoke   a handful of NetworkPolicy specs across nodes (CI with a cold build)
  netpol  every NetworkPolicy spec (focus NetworkPolicy, skip SCTP: no SCTP in this kernel)
  network netpol + `Networking Granular Checks: Pods`, ClusterIP Services through
          kube-proxy, hostPort through the chained portmap plugin
  none    skip the upstream specs
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass

SUITES = {
    "smoke": [("NetworkPolicy.*(should support a 'default-deny-ingress' policy|"
               "should enforce policy to allow traffic from pods within server namespace based on PodSelector|"
               "should enforce policy based on Ports|should deny ingress access to updated pod)", "SCTP")],
    "netpol": [("NetworkPolicy", "SCTP")],
    "network": [("NetworkPolicy", "SCTP"),
                (r"Networking Granular Checks: Pods", r"SCTP|Feature:|Disruptive"),
                (r"\[sig-network\] Services should (serve a basic endpoint from pods|serve multiport endpoints"
                 r"|be able to change the type from ClusterIP|provide secure master service|"
                 r"serve endpoints on same port and different protocols|be able to create a functioning NodePort)",
                 r"SCTP|Feature:|Disruptive|ESIPP|LoadBalancer"),
                (r"HostPort", r"SCTP|Feature:|Disruptive")],
}


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


def run_suite(lab, focus: str, skip: str, report_dir: str, timeout: float = 3600) -> Result:
    os.makedirs(report_dir, exist_ok=True)
    log = os.path.join(report_dir, "e2e.log")
    argv = ["nsenter", f"--net=/run/netns/{lab.cp}", lab.bin("e2e.test"),
            f"--kubeconfig={lab.kubeconfig}", "--provider=skeleton", "--num-nodes=2",
            f"--ginkgo.focus={focus}", f"--ginkgo.skip={skip}", "--ginkgo.noColor",
            f"--report-dir={report_dir}", "--disable-log-dump", "--ginkgo.flakeAttempts=1"]
    t0 = time.monotonic()
    with open(log, "w") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=report_dir, timeout=timeout)
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


def run_named(lab, suite: str, report_dir: str) -> SuiteRun:
    """SUITES[suite] against `lab`, one report dir per focus set; summary.txt in report_dir."""
    if suite not in SUITES:
        raise ValueError(f"unknown upstream suite {suite!r}: one of {', '.join(SUITES)} or none")
    out = SuiteRun(suite, [run_suite(lab, focus, skip, os.path.join(report_dir, str(i)))
                           for i, (focus, skip) in enumerate(SUITES[suite])])
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "summary.txt"), "w") as f:
        f.write(out.summary + "\n" + "\n".join(out.failures) + "\n")
    return out


def check_suite_from_env(lab) -> None:
    """The body of a pytest test: the suite E2E_UPSTREAM names (default netpol) against
    `lab`, reports under E2E_REPORT_DIR; skips for "none", fails on any failed spec."""
    import pytest
    suite = os.environ.get("E2E_UPSTREAM", "netpol")
    if suite == "none":
        pytest.skip("E2E_UPSTREAM=none")
    out = run_named(lab, suite, os.environ.get("E2E_REPORT_DIR", f"/var/tmp/tortie-e2e/{lab.prefix}"))
    print(f"\nupstream e2e ({suite}):\n{out.summary}")
    assert not out.failures, out.summary + "\n" + "\n".join(out.failures)


def main(argv: list[str]) -> int:
    """python -m tests.kube.upstream <prefix of a running cluster> [suite] [report dir]"""
    import sys
    from tests.kube.cluster import KubeLab
    if not argv:
        print(main.__doc__, file=sys.stderr)
        return 2
    lab = KubeLab.attach(argv[0])
    suite = argv[1] if len(argv) > 1 else "netpol"
    out = run_named(lab, suite, argv[2] if len(argv) > 2 else f"/var/tmp/tortie-e2e/{lab.prefix}-{suite}")
    print(out.summary)
    for f in out.failures:
        print(f"  FAIL {f}")
    return 1 if out.failures else 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
