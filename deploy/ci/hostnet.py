"""Rewrite a merged compose file for a loopback-only CI without a registry.

Every service joins the host network (this sandbox has no bridge networking), service names
resolve to 127.0.0.1, published ports are dropped (each service listens on its own port), and
builds use the host network. Reads ``docker-compose config`` output on stdin.
"""

import sys

import yaml

doc = yaml.safe_load(sys.stdin)
services = doc.get("services", {})
for service in services.values():
    for key in ("ports", "networks", "hostname", "links"):
        service.pop(key, None)
    service["network_mode"] = "host"
    service["extra_hosts"] = [f"{name}:127.0.0.1" for name in sorted(services)]
    build = service.get("build")
    if isinstance(build, str):
        service["build"] = {"context": build, "network": "host"}
    elif isinstance(build, dict):
        build["network"] = "host"
doc.pop("networks", None)
yaml.safe_dump(doc, sys.stdout, sort_keys=False)
