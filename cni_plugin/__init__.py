"""tortie's CNI plugin: spec handling (stdlib only) and the pod plumbing (rtnetlink
through podnet.rtnl, imported lazily).  Entry point: cni_plugin.main:main; see cni_plugin/commands.py."""
