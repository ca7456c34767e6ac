#!/usr/bin/env python3
"""Checks docker-compose.yml without Docker: against the Compose Specification's JSON schema
(compose/config/compose_spec.json of the docker-compose 1.29.2 wheel, fetched from PyPI once),
then what this project promises of it: every service has a health check, depends_on names real
services, and Envoy waits for a healthy control plane.

usage: check-compose.py COMPOSE_FILE CACHE_DIR
"""
import json
import os
import re
import subprocess
import sys
import zipfile

compose_file, cache = sys.argv[1], sys.argv[2]
os.makedirs(cache, exist_ok=True)

try:
    import jsonschema
    import yaml
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "jsonschema", "pyyaml"], check=True)
    import jsonschema
    import yaml

schema_path = os.path.join(cache, "compose_spec.json")
if not os.path.exists(schema_path):
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--dest", cache, "docker-compose==1.29.2"], check=True)
    wheel = next(f for f in os.listdir(cache) if f.startswith("docker_compose-1.29.2") and f.endswith(".whl"))
    with zipfile.ZipFile(os.path.join(cache, wheel)) as z, open(schema_path, "wb") as out:
        out.write(z.read("compose/config/compose_spec.json"))

with open(compose_file) as f:
    text = f.read()
# ${VAR:?message} and ${VAR:-default}: what compose interpolates, with a stand-in value
text = re.sub(r"\$\{([A-Z0-9_]+)(:[?-][^}]*)?\}", lambda m: "x", text)
compose = yaml.safe_load(text)
with open(schema_path) as f:
    schema = json.load(f)

# That schema predates the top-level `name` (the project name, in the spec since 2021): checked
# here by the spec's own rule instead.
problems = []
name = compose.pop("name", None)
if name is not None and not (isinstance(name, str) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name)):
    problems.append(f"name {name!r} is not a valid project name")
for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)):
    problems.append(f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}")

services = compose.get("services", {})
for service_name, service in services.items():
    if "healthcheck" not in service:
        problems.append(f"service {service_name} has no healthcheck")
    depends = service.get("depends_on", {})
    for dep in depends if isinstance(depends, list) else depends.keys():
        if dep not in services:
            problems.append(f"{service_name} depends on unknown service {dep}")
envoy_deps = services.get("envoy", {}).get("depends_on", {})
if not isinstance(envoy_deps, dict) or envoy_deps.get("control-plane", {}).get("condition") != "service_healthy":
    problems.append("envoy must wait for a healthy control-plane")

for problem in problems:
    print(f"{compose_file}: {problem}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"{compose_file}: valid ({len(services)} services)")
