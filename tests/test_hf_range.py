"""The supported transformers / accelerate range: declared once in pyproject.toml (the same in the
hf, finetune and test extras), its floor is what CI installs (ci/constraints-cpu.txt pins it, and
.ci/run installs with those constraints), the shipped model code refuses what lies outside it
(tests/test_export_hf_remote.py::test_remote_code_names_the_transformers_range), and the versions
these tests run on lie inside it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, dict[str, Requirement]]:
    opt = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: {(r := Requirement(s)).name: r for s in reqs} for name, reqs in opt.items()}


def _floor(req: Requirement) -> Version:
    (low,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return low


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "ci" / "constraints-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, v = line.partition("==")
            pins[name.strip().lower()] = Version(v.strip())
    return pins


def test_ci_installs_the_declared_floor():
    extras, pins = _extras(), _pins()
    for pkg in ("transformers", "accelerate"):
        specs = {str(extras[e][pkg].specifier) for e in ("hf", "finetune", "test")}
        assert len(specs) == 1, f"{pkg}: the hf / finetune / test extras declare different ranges {specs}"
        req = extras["hf"][pkg]
        assert pkg in pins, f"ci/constraints-cpu.txt does not pin {pkg}: CI would test the newest, not the floor"
        assert pins[pkg] == _floor(req), f"ci/constraints-cpu.txt pins {pkg} {pins[pkg]}, the floor is {_floor(req)}"
        assert req.specifier.contains(pins[pkg])
    # the CI script installs with those constraints (the README's install line)
    assert "-c ci/constraints-cpu.txt" in (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' -c ci/constraints-cpu.txt" in (ROOT / "README.md").read_text()


def test_shipped_guard_is_the_declared_range():
    req = _extras()["hf"]["transformers"]
    low, high = _floor(req), [Version(s.version) for s in req.specifier if s.operator == "<"][0]
    for name in ("configuration_data2vec2.py", "modeling_data2vec2.py"):
        text = (ROOT / "d2v2_scale" / "export" / "hf_remote" / name).read_text()
        (lo_t, hi_t), = {m.groups() for m in re.finditer(r"\((\d+, \d+)\) <= .* < \((\d+, \d+)\)", text)}
        assert Version(lo_t.replace(", ", ".")) == low and Version(hi_t.replace(", ", ".")) == high, name
        assert f"needs transformers{_spec_text(req)}," in text and f"'transformers{_spec_text(req)}'" in text, name


def _spec_text(req: Requirement) -> str:
    """'>=5.24,<6' as pyproject writes it (packaging may reorder the parts)."""
    raw = re.search(r'"transformers([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert req.specifier == Requirement("transformers" + raw).specifier
    return raw


def test_installed_versions_are_in_range():
    extras = _extras()
    for pkg in ("transformers", "accelerate"):
        assert extras["hf"][pkg].specifier.contains(Version(version(pkg))), \
            f"{pkg} {version(pkg)} is outside pyproject.toml's {extras['hf'][pkg].specifier}"
