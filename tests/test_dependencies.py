"""One list of dependencies: pyproject.toml is the source of truth; requirements.txt repeats its core dependencies
and its notebooks extra (for `pip install -r requirements.txt`), and the Makefile installs from the extras."""
import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:      # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = ROOT / "requirements.txt"


def key(req: Requirement) -> tuple:
    """What must agree: the version specifiers, extras and environment markers (the name is the dict key)."""
    return str(req.specifier), tuple(sorted(req.extras)), str(req.marker or "")


def describe(req: Requirement) -> str:
    specifier, extras, marker = key(req)
    extras = f"[{','.join(extras)}]" if extras else ""
    return extras + (specifier or "(any version)") + (f"; {marker}" if marker else "")


def pyproject_requirements() -> dict[str, tuple[Requirement, str]]:
    """name -> (requirement, where in pyproject.toml) for the core dependencies and the notebooks extra."""
    project = PYPROJECT["project"]
    sections = [("[project] dependencies", project["dependencies"]),
                ("[project.optional-dependencies] notebooks", project["optional-dependencies"]["notebooks"])]
    found: dict[str, tuple[Requirement, str]] = {}
    for where, lines in sections:
        for line in lines:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name in found:
                assert key(found[name][0]) == key(req), (
                    f"{req.name}: pyproject.toml lists it as {describe(found[name][0])} in {found[name][1]} "
                    f"and as {describe(req)} in {where}")
                continue
            found[name] = req, f"pyproject.toml {where}"
    return found


def requirements_txt() -> tuple[dict[str, tuple[Requirement, str]], list[str]]:
    """name -> (requirement, 'requirements.txt line N'), and the editable installs (-e) in requirements.txt."""
    found: dict[str, tuple[Requirement, str]] = {}
    editables = []
    for number, raw in enumerate(REQUIREMENTS.read_text().splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        if line.startswith("-"):
            option, _, value = line.partition(" ")
            if option in ("-e", "--editable"):
                editables.append(value.strip())
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in found, f"{req.name}: listed twice in requirements.txt ({found[name][1]} and line {number})"
        found[name] = req, f"requirements.txt line {number}"
    return found, editables


def test_requirements_txt_lists_the_core_dependencies_and_the_notebooks_extra_of_pyproject():
    ours, (theirs, _) = pyproject_requirements(), requirements_txt()
    problems = []
    for name in sorted(ours.keys() | theirs.keys()):
        if name not in theirs:
            req, where = ours[name]
            problems.append(f"{req.name} {describe(req)}: in {where} but not in requirements.txt")
        elif name not in ours:
            req, where = theirs[name]
            problems.append(f"{req.name} {describe(req)}: in {where} but not in pyproject.toml's dependencies "
                            f"or notebooks extra")
        elif key(ours[name][0]) != key(theirs[name][0]):
            (a, a_where), (b, b_where) = ours[name], theirs[name]
            problems.append(f"{a.name}: {describe(a)} in {a_where} but {describe(b)} in {b_where}")
    assert not problems, "pyproject.toml and requirements.txt disagree:\n" + "\n".join(problems)


def test_requirements_txt_installs_the_package_editable_with_the_notebooks_extra():
    _, editables = requirements_txt()
    extras = [set(re.fullmatch(r"\.\[(.*)\]", e).group(1).replace(" ", "").split(","))
              for e in editables if re.fullmatch(r"\.\[(.*)\]", e)]
    assert any("notebooks" in e for e in extras), f"requirements.txt needs `-e .[notebooks]`, has -e {editables}"


def test_the_dev_extra_has_what_make_test_runs():
    dev = {canonicalize_name(Requirement(line).name) for line in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff", "papermill", "ipykernel"} <= dev, dev


def test_the_dev_extra_has_the_export_extra_so_the_export_tests_run():
    extras = PYPROJECT["project"]["optional-dependencies"]
    export = {canonicalize_name(Requirement(line).name): key(Requirement(line)) for line in extras["export"]}
    dev = {canonicalize_name(Requirement(line).name): key(Requirement(line)) for line in extras["dev"]}
    assert export.keys() == {"onnx", "onnxruntime", "onnx-ir"}, export
    assert {name: dev.get(name) for name in export} == export, "the dev extra must repeat the export extra"


def test_the_makefile_installs_from_pyproject_not_by_hand():
    """Each `pip install` in the Makefile names only the project's extras or requirements.txt, no packages."""
    recipes = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t")]
    installs = [line for line in recipes if "pip install" in line]
    assert installs, "the Makefile installs nothing with pip"
    for line in installs:
        words = shlex.split(line.split("pip install", 1)[1])
        named = [w for w in words if not w.startswith("-") and w != "requirements.txt" and not w.startswith(".")]
        assert not named, f"Makefile installs {named} by hand; add them to an extra in pyproject.toml: {line.strip()}"
