"""The fixed addresses of the Calico-style pod wiring (stdlib only: results on the
binary's agent path are built without importing the plumbing)."""
HOST_MAC = "ee:ee:ee:ee:ee:ee"
# Every pod's IPv4 gateway: never on any wire, answered by proxy ARP on the host veth.
GATEWAY_V4 = "169.254.1.1"
# The EUI-64 link-local address of MAC ee:ee:ee:ee:ee:ee, i.e. the host veth's own address.
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"
